"""Held-out sessions: a fixed number per region per modality, drawn by a seed, never pretrained on.

The draw is deterministic: regions in sorted order, each region's candidates sorted by session id, one
numpy generator seeded by ``seed``. A session recorded in several regions (a Neuropixels probe through
VISp and VISl) is held out for the first region that draws it and is no candidate for the others, so
every region gets ``n`` distinct sessions. A region with fewer than ``n`` candidates is one ValueError
line, before any trial starts. ``SWEEP/heldout.json`` records the draw.

Labels that name no brain area (``NOT_AREAS``: a probe's channels outside any annotated structure,
Allen's ``grey`` and ``root``, and ingest's ``unknown``) are no region to hold out for: every probe has
them, so holding a session out for each would take two more EPhys sessions out of pretraining per sweep
without adding an area to evaluate. The held-out sessions' records of them are still tested and kept in
results.parquet, but no score, table or plot counts them (``is_area``).

The pretraining pool is every session not held out; a pretraining set of ``k`` sessions per region takes
the first ``k`` of a seeded order of that region's pool, so smaller sets are nested in larger ones
(Fig. 2's scaling curves add sessions, they do not resample them).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from shards import manifest
from shards.store import Store

MODALITIES = ("ephys", "ophys")
NOT_AREAS = frozenset({"grey", "root", "unknown"})  # region labels that name no brain area (module docstring)


def is_area(region: str) -> bool:
    """Whether a record's region label names a brain area, i.e. counts in a sweep's scores and tables."""
    return region not in NOT_AREAS


def area_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of a results frame whose record is in a brain area (what sweep scores, tables and plots count)."""
    return df[df.region.map(is_area)]


def session_table(store: str) -> pd.DataFrame:
    """(session_id, modality, region) rows of the store's sessions table, one per recorded region."""
    t = manifest.read_table(Store(store), manifest.SESSIONS).to_pandas()
    return t[["session_id", "modality", "region"]].drop_duplicates().reset_index(drop=True)


def regions_of(table: pd.DataFrame, modality: str) -> list[str]:
    return sorted(table[table.modality == modality].region.unique())


def choose_heldout(table: pd.DataFrame, n: int, seed: int, store: str = "the store") -> dict[str, dict[str, list[str]]]:
    """{modality: {region: [n session ids]}}; ValueError naming the region that has too few sessions."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[str]]] = {}
    for mod in MODALITIES:
        taken: set[str] = set()
        out[mod] = {}
        for region in filter(is_area, regions_of(table, mod)):
            rows = table[(table.modality == mod) & (table.region == region)]
            candidates = sorted(set(rows.session_id) - taken)
            if len(candidates) < n:
                raise ValueError(f"{store}: {mod} region {region} has {len(candidates)} session(s) left to hold "
                                 f"out, fewer than held_out={n}: lower --held-out or add sessions")
            pick = sorted(rng.choice(candidates, n, replace=False).tolist())
            out[mod][region] = pick
            taken.update(pick)
    return out


def heldout_ids(heldout: dict[str, dict[str, list[str]]], modality: str | None = None) -> list[str]:
    """Every held-out session id (of one modality, or all), sorted."""
    mods = [modality] if modality else list(heldout)
    return sorted({s for m in mods for ids in heldout.get(m, {}).values() for s in ids})


def pretraining_sessions(table: pd.DataFrame, heldout: dict[str, dict[str, list[str]]], modality: str,
                         regions: list[str] | None, set_size: int | None, seed: int) -> list[str]:
    """The pretraining sessions of one modality: per region (``regions``, or all), the first ``set_size``
    of the pool (sessions not held out) in a seeded order; sorted, never a held-out session."""
    held = set(heldout_ids(heldout))
    chosen: set[str] = set()
    for region in regions if regions is not None else regions_of(table, modality):
        rows = table[(table.modality == modality) & (table.region == region)]
        pool = sorted(set(rows.session_id) - held)
        order = np.random.default_rng([seed, _stable(modality), _stable(region)]).permutation(len(pool))
        ranked = [pool[i] for i in order]
        chosen.update(ranked if set_size is None else ranked[:set_size])
    return sorted(chosen)


def _stable(text: str) -> int:
    """A process-independent integer for a name (Python's hash() is salted per process)."""
    return int.from_bytes(text.encode()[:16].ljust(16, b"\0"), "little")


def write_heldout(sweep: Store, heldout: dict, seed: int, n: int) -> None:
    """SWEEP/heldout.json: the seed, the number per region, and the sessions per modality and region."""
    doc = {"seed": seed, "per_region": n, "sessions": heldout}
    sweep.write_bytes("heldout.json", (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
