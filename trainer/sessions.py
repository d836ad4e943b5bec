"""Which modality each session of a store is: what a finetuning run's mix is made of (``trainer.finetune``)
and how the per-session baselines select exactly one session (``trainer.baselines``)."""

from __future__ import annotations

from shards import manifest
from shards.store import Store


def session_modalities(store: str, sessions: list[str]) -> dict[str, str]:
    """{session id: modality} for ``sessions``, from the store's sessions table; ValueError naming the
    sessions it does not hold."""
    table = manifest.load(Store(store)).sessions.to_pandas()
    mods = dict(zip(table.session_id, table.modality))
    missing = [s for s in sessions if s not in mods]
    if missing:
        raise ValueError(f"session(s) {missing} not in {store}/sessions.parquet")
    return {s: mods[s] for s in sessions}


def mix_of_session(store: str, session_id: str) -> str:
    """A mix that selects exactly one session, whatever its modality."""
    return f"{session_modalities(store, [session_id])[session_id]}=1"
