"""Build small shard stores in tests straight from in-memory records (no NWB, no Ray): fast,
and with deliberately uneven sessions for the stream tests."""

from __future__ import annotations

import numpy as np

from ingest.chunks import ChunkConfig, chunk_samples
from ingest.records import ArrayTrace, Intervals, SessionRecord
from ingest.splits import assign_splits
from ingest.tables import table_rows
from shards import manifest
from shards.store import Store
from shards.writer import RecordShardWriter


def stimuli(dur: float, seed: int) -> list[Intervals]:
    rng = np.random.default_rng(seed)
    third = dur / 3
    sg = np.arange(0, third, 0.25)
    dg = np.arange(third, 2 * third - 3, 3.0)
    ns = np.arange(2 * third, dur, 0.25)
    return [
        Intervals("static_gratings", sg, sg + 0.25, rng.integers(0, 6, len(sg))),
        Intervals("drifting_gratings", dg, dg + 2.0, rng.integers(0, 8, len(dg))),
        Intervals("natural_scenes", ns, ns + 0.25, rng.integers(0, 119, len(ns))),
    ]


def ephys(session: str, region: str, dur: float, n_units: int = 6, rate: float = 8.0, seed: int = 0,
          first_id: int = 100) -> SessionRecord:
    rng = np.random.default_rng(seed)
    n = rng.poisson(rate * n_units * dur)
    times = np.sort(rng.uniform(0, dur, n))
    units = rng.integers(0, n_units, n).astype(np.int32)
    return SessionRecord(session, "ephys", region, "m", f"{session}.nwb", [str(first_id + i) for i in range(n_units)],
                         0.0, dur, stimuli(dur, seed), spike_times=times, spike_units=units)


def ophys(session: str, region: str, dur: float, n_units: int = 5, seed: int = 0) -> SessionRecord:
    rng = np.random.default_rng(seed)
    ft = np.arange(0, dur, 1 / 30.0)
    dff = rng.normal(size=(len(ft), n_units)).astype(np.float32)
    return SessionRecord(session, "ophys", region, "m", f"{session}.nwb", [str(i) for i in range(n_units)],
                         0.0, dur, stimuli(dur, seed), trace=ArrayTrace(ft, dff))


def make_store(uri: str, records: list[SessionRecord], shard_bytes: int = 96 << 10, chunk_s: float = 10.0) -> Store:
    store = Store(uri)
    rows: dict[str, list] = {manifest.MANIFEST: [], manifest.SESSIONS: [], manifest.UNITS: [], manifest.CHUNKS: []}
    for rec in records:
        splits = assign_splits(rec.session_id, rec.region, rec.t_start, rec.t_end, rec.stimuli)
        w = RecordShardWriter(store, rec.modality, rec.region, rec.session_id, shard_bytes)
        for split, sample in chunk_samples(rec, splits, ChunkConfig(chunk_s)):
            w.add(split, sample)
        w.close()
        s, u = table_rows(rec, "0" * 64, splits)
        rows[manifest.MANIFEST] += w.shard_rows
        rows[manifest.CHUNKS] += w.chunk_rows
        rows[manifest.SESSIONS].append(s)
        rows[manifest.UNITS] += u
    for name in (manifest.SESSIONS, manifest.UNITS, manifest.CHUNKS, manifest.MANIFEST):
        manifest.write_table(store, name, rows[name])
    return store


def held_out_records() -> list[SessionRecord]:
    """Two pretraining sessions per modality and one to hold out each (e2, o2), long enough for valid and test
    splits."""
    return [ephys("e0", "VISp", 200.0, seed=1), ephys("e1", "VISp", 200.0, seed=2, first_id=100),
            ephys("e2", "VISp", 120.0, seed=3, first_id=200),
            ophys("o0", "VISp", 200.0, seed=4), ophys("o1", "VISl", 200.0, seed=5), ophys("o2", "VISal", 120.0, seed=6)]


def uneven_records() -> list[SessionRecord]:
    """EPhys in two regions (one session spans both), OPhys in two regions, very different sizes."""
    return [
        ephys("e1", "VISp", 300.0, seed=1),
        ephys("e1", "VISl", 300.0, n_units=3, seed=2, first_id=200),
        ephys("e2", "VISp", 90.0, seed=3),
        ophys("o1", "VISp", 240.0, seed=4),
        ophys("o2", "VISal", 60.0, n_units=8, seed=5),
    ]
