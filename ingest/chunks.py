"""Cut a SessionRecord's split intervals into chunks and turn each chunk into a Sample.

A chunk is a contiguous stretch of one split (``chunk_s`` long, ~10 s): long
enough to cut many 1-s training windows from, short enough that a sample is a
few hundred KB and one ranged read fetches it.

NaN in dF/F never reaches a shard: frames where every ROI is NaN are dropped,
and a ROI with any NaN inside a chunk is left out of that chunk's sample (the
sample lists the units it carries).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ingest.records import SessionRecord
from shards.format import FORMAT_VERSION, Sample


@dataclass(frozen=True)
class ChunkConfig:
    chunk_s: float = 10.0


def chunk_bounds(a: float, b: float, chunk_s: float) -> list[tuple[float, float]]:
    """Equal pieces of [a, b), each within a factor 1.5 of chunk_s (a short span is one piece)."""
    n = max(1, int(round((b - a) / chunk_s)))
    edges = np.linspace(a, b, n + 1)
    return [(float(edges[i]), float(edges[i + 1])) for i in range(n)]


def _stimuli_in(record: SessionRecord, a: float, b: float) -> dict:
    task, start, end, label = [], [], [], []
    for iv in record.stimuli:
        m = (iv.end > a) & (iv.start < b)
        n = int(m.sum())
        task += [iv.task] * n
        start += iv.start[m].tolist()
        end += iv.end[m].tolist()
        label += iv.label[m].tolist()
    return {"task": task, "start": start, "end": end, "label": label}


def _ephys_arrays(record: SessionRecord, a: float, b: float) -> tuple[dict, list[str]]:
    assert record.spike_times is not None and record.spike_units is not None
    i0, i1 = np.searchsorted(record.spike_times, [a, b], side="left")
    arrays = {
        "spike_times": np.ascontiguousarray(record.spike_times[i0:i1], dtype=np.float64),
        "spike_units": np.ascontiguousarray(record.spike_units[i0:i1], dtype=np.int32),
    }
    return arrays, list(record.unit_ids)


def _ophys_arrays(record: SessionRecord, a: float, b: float) -> tuple[dict, list[str]]:
    trace = record.trace
    assert trace is not None
    i0, i1 = np.searchsorted(trace.frame_times, [a, b], side="left")
    times = np.asarray(trace.frame_times[i0:i1], dtype=np.float64)
    dff = trace.read(int(i0), int(i1)) if i1 > i0 else np.zeros((0, trace.n_units), np.float32)
    nan = np.isnan(dff)
    if nan.any():
        keep_frames = ~nan.all(axis=1)
        times, dff, nan = times[keep_frames], dff[keep_frames], nan[keep_frames]
        keep_units = ~nan.any(axis=0)
        dff = dff[:, keep_units]
        units = [u for u, k in zip(record.unit_ids, keep_units) if k]
    else:
        units = list(record.unit_ids)
    arrays = {"frame_times": np.ascontiguousarray(times), "dff": np.ascontiguousarray(dff, dtype=np.float32)}
    return arrays, units


def sample_key(session_id: str, region: str, split: str, k: int) -> str:
    """``<session>__<region>__<split>_<k>``; a short digest replaces session/region when they are
    long, so member names stay within ustar's 100 bytes (and webdataset's key has no dots)."""
    key = f"{session_id}__{region}__{split}_{k:05d}"
    if len(key) > 80:
        import hashlib

        digest = hashlib.sha1(f"{session_id}/{region}".encode()).hexdigest()[:16]
        key = f"{session_id[:24]}-{digest}__{split}_{k:05d}"
    return key


def chunk_samples(
    record: SessionRecord, split_intervals: dict[str, list[tuple[float, float]]], config: ChunkConfig = ChunkConfig()
) -> Iterator[tuple[str, Sample]]:
    """(split, Sample) for every chunk of every split interval, in time order per split: what the
    shard writer is given. (Not ``shards.manifest.record_samples``, which reads a record's samples
    back from a store.)"""
    arrays_of = _ephys_arrays if record.modality == "ephys" else _ophys_arrays
    for split, intervals in split_intervals.items():
        k = 0
        for a0, b0 in intervals:
            for a, b in chunk_bounds(a0, b0, config.chunk_s):
                arrays, units = arrays_of(record, a, b)
                key = sample_key(record.session_id, record.region, split, k)
                meta = {
                    "format": FORMAT_VERSION,
                    "key": key,
                    "session_id": record.session_id,
                    "modality": record.modality,
                    "region": record.region,
                    "split": split,
                    "t_start": a,
                    "t_end": b,
                    "units": units,
                    "stimuli": _stimuli_in(record, a, b),
                }
                k += 1
                yield split, Sample(key=key, meta=meta, arrays=arrays)

