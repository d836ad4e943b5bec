"""Which modality each session of a store is: what a finetuning run's mix is made of (``trainer.finetune``)
and how the per-session baselines select exactly one session (``trainer.baselines``)."""

from __future__ import annotations

from shards import manifest
from shards.store import Store


def _sessions_table(store: str, sessions: list[str]):
    """The store's sessions table, its rows of ``sessions``; ValueError naming the sessions it does not hold."""
    table = manifest.load(Store(store)).sessions.to_pandas()
    known = set(table.session_id)
    missing = [s for s in sessions if s not in known]
    if missing:
        raise ValueError(f"session(s) {missing} not in {store}/sessions.parquet")
    return table[table.session_id.isin(set(sessions))]


def session_modalities(store: str, sessions: list[str] | None = None) -> dict[str, str]:
    """{session id: modality} for ``sessions``, from the store's sessions table; ValueError naming the
    sessions it does not hold. None: every session the store holds."""
    if sessions is None:
        table = manifest.load(Store(store)).sessions.to_pandas()
        return dict(zip(table.session_id, table.modality))
    table = _sessions_table(store, sessions)
    mods = dict(zip(table.session_id, table.modality))
    return {s: mods[s] for s in sessions}


def unit_regions(store: str) -> dict[str, str]:
    """{unit id: its region} for every unit the store's units table holds (that table alone is read)."""
    table = manifest.read_table(Store(store), manifest.UNITS).to_pandas()
    return dict(zip(table.unit_id, table.region))


def records_per_modality(store: str, sessions: list[str]) -> dict[str, int]:
    """{modality: how many records (session x region rows of sessions.parquet) ``sessions`` hold}, sorted by
    modality; ValueError naming the sessions the store does not hold."""
    table = _sessions_table(store, sessions)
    return {m: int(n) for m, n in sorted(table.groupby("modality").size().items())}


def finetune_mix(store: str, sessions: list[str]) -> str:
    """A finetuning's mix: each modality weighted by its records, so every record gets the same share of the
    windows, as every record weighs the same in the headline metric (a mean over records).

    Why not one weight per modality: a Neuropixels session holds a record per region (3 on the benchmark) and a
    plane one, so equal modality weights read the plane's windows 3x as often as each region's. Measured on the
    benchmark (docs/model.md section 13, 3 seeds): held-out OPhys +0.03 / 0.00 / +0.05 (static gratings positive on
    every seed, natural scenes too), EPhys level."""
    return ",".join(f"{m}={n}" for m, n in records_per_modality(store, sessions).items())


def mix_of_session(store: str, session_id: str) -> str:
    """A mix that selects exactly one session, whatever its modality."""
    return f"{session_modalities(store, [session_id])[session_id]}=1"
