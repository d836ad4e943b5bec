"""Windows -> tokens -> one packed batch (docs/batch.md), as in the papers.

EPhys: one token per spike (global unit index, time). OPhys: one token per frame
per ROI (unit index, time, dF/F value), POYO+'s tokenizer for regular series, or one per
``calcium_bin`` frames (their mean) per ROI.
Output queries are the labelled stimulus presentations in the window; each carries its
presentation id (``presentation_id``: the start time in integer microseconds), so evaluation
can merge the windows that query the same presentation.

All per-window work is a handful of numpy slices on an already decoded chunk
(``DecodedChunk``: arrays plus its units mapped to global indices once), and a
batch is concatenated once: no per-token Python, no padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from shards.format import Sample
from shards.schema import MODALITY_INDEX, TASKS

TASK_INDEX = {name: i for i, name in enumerate(TASKS)}  # 0 static, 1 drifting, 2 natural scenes


def presentation_id(start: np.ndarray) -> np.ndarray:
    """int64 id of a presentation: its start in the file clock in whole microseconds.

    Exact and stable: a presentation that crosses a chunk edge is listed, unclipped, in both
    chunks' stimulus tables (and in every region's chunks of an EPhys session) with the same
    float start, so every window that queries it gets the same id. Unique within (session,
    task): two presentations of one task never start within a microsecond of each other."""
    return np.rint(np.asarray(start, dtype=np.float64) * 1e6).astype(np.int64)


@dataclass
class Vocab:
    """Global unit, session and record indices, from units.parquet / sessions.parquet (sorted ids).

    A record is one (session_id, region) row of sessions.parquet: an EPhys session holds one per
    brain region, and the splits are drawn per record (``ingest/splits.py``)."""

    units: dict[str, int]
    sessions: dict[str, int]
    records: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def from_tables(cls, units: pd.DataFrame, sessions: pd.DataFrame) -> Vocab:
        u = sorted(units.unit_id.unique())
        s = sorted(sessions.session_id.unique())
        r = sorted(set(zip(sessions.session_id, sessions.region)))
        return cls({k: i for i, k in enumerate(u)}, {k: i for i, k in enumerate(s)},
                   {k: i for i, k in enumerate(r)})


@dataclass
class DecodedChunk:
    """A decoded sample, ready to cut windows from."""

    key: str
    modality: int
    session: int
    t_start: float
    t_end: float
    unit_index: np.ndarray  # int64 (U,) global index of each of the sample's units
    times: np.ndarray  # float64: spike times (EPhys) or frame times (OPhys)
    spike_units: np.ndarray | None  # int32 (n,) EPhys: index into unit_index
    dff: np.ndarray | None  # float32 (T, U) OPhys
    q_task: np.ndarray  # int64 labelled presentations
    q_start: np.ndarray
    q_end: np.ndarray
    q_label: np.ndarray
    q_id: np.ndarray | None = None  # int64 presentation ids (presentation_id(q_start) when None)
    record: int = -1  # global (session_id, region) record index (Vocab.records); -1 when unknown

    @classmethod
    def from_sample(cls, sample: Sample, vocab: Vocab) -> DecodedChunk:
        m = sample.meta
        sid = m["session_id"]
        try:
            unit_index = np.array([vocab.units[f"{sid}/{u}"] for u in m["units"]], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"sample {sample.key}: unit {exc.args[0]} is not in units.parquet") from None
        st = m["stimuli"]
        task = np.array([TASK_INDEX.get(t, -1) for t in st["task"]], dtype=np.int64)
        label = np.asarray(st["label"], dtype=np.int64)
        keep = (task >= 0) & (label >= 0)
        ephys = m["modality"] == "ephys"
        a = sample.arrays
        try:
            record = vocab.records[(sid, m["region"])]
        except KeyError:
            raise ValueError(f"sample {sample.key}: record ({sid}, {m.get('region')}) is not in sessions.parquet") from None
        return cls(
            key=sample.key, modality=MODALITY_INDEX[m["modality"]], session=vocab.sessions[sid],
            t_start=float(m["t_start"]), t_end=float(m["t_end"]), unit_index=unit_index,
            times=a["spike_times"] if ephys else a["frame_times"],
            spike_units=a["spike_units"] if ephys else None, dff=None if ephys else a["dff"],
            q_task=task[keep], q_start=np.asarray(st["start"], np.float64)[keep],
            q_end=np.asarray(st["end"], np.float64)[keep], q_label=label[keep],
            q_id=presentation_id(np.asarray(st["start"], np.float64)[keep]), record=record,
        )


@dataclass(frozen=True)
class TokenConfig:
    window_s: float = 1.0
    unit_dropout: bool = False  # training only
    min_keep_frac: float = 0.5  # dropout keeps a uniform number of units in [frac * U, U]
    min_overlap: float = 0.5  # a presentation is queried if it overlaps the window by this fraction
    # of the shorter of (presentation, window)
    calcium_lag_s: float = 0.0  # OPhys: read frames this much later than the window, stamped this much earlier
    calcium_bin: int = 1  # OPhys: this many consecutive frames averaged into one token per ROI
    calcium_noise: float = 0.0  # training only: N(0, this) added to every calcium token's dF/F (a new draw per window)


def window_tokens(c: DecodedChunk, t0: float, config: TokenConfig, rng: np.random.Generator | None):
    """(unit_index, times, values, q_times, q_task, q_label, q_presentation, q_span, units) of one window
    [t0, t0 + window_s); a query's span is how long its presentation overlaps the window (the query time is the
    overlap's midpoint); ``units`` are the window's units, those unit dropout kept, whether they have a token in
    the window or not (a silent unit is evidence too).

    OPhys with ``calcium_lag_s`` = L: the frames of [t0 + L, t0 + window_s + L), stamped L earlier, so a
    presentation's calcium response (GCaMP peaks a few hundred ms after the stimulus) lands at the
    presentation's own time and inside the window that queries it. Frames past the chunk's end are
    not there: a window ending within L of it reads fewer frames (evaluation merges the windows that
    query a presentation, so an earlier window still sees its response).

    OPhys with ``calcium_bin`` = K: each ROI's frames, counted from the window's first, are averaged K at a
    time (the last group may be shorter) and stamped at their mean time. Calcium tokens are ~94 % of a
    mixed batch's tokens (200 ROIs x 30 frames against ~360 spikes per EPhys window), and GCaMP's
    response rises over ~0.1 s and decays over 0.4-0.7 s, so 3 frames (0.1 s) tell the encoder little
    more than their mean does, at 3x the keys (docs/model.md section 6 measures both)."""
    w = config.window_s
    i0, i1 = np.searchsorted(c.times, [t0, t0 + w], side="left")
    n_units = len(c.unit_index)
    keep = None
    if config.unit_dropout and rng is not None and n_units > 1:
        n_keep = int(rng.integers(max(1, int(np.ceil(config.min_keep_frac * n_units))), n_units + 1))
        if n_keep < n_units:
            keep = np.zeros(n_units, dtype=bool)
            keep[rng.choice(n_units, n_keep, replace=False)] = True
    if c.spike_units is not None:  # EPhys: one token per spike
        su = c.spike_units[i0:i1]
        times = c.times[i0:i1]
        if keep is not None:
            m = keep[su]
            su, times = su[m], times[m]
        units = c.unit_index[su]
        values = np.zeros(len(units), dtype=np.float32)
        rel = (times - t0).astype(np.float32)
    else:  # OPhys: one token per frame (or per calcium_bin frames) per ROI
        lag = config.calcium_lag_s
        if lag:
            i0, i1 = np.searchsorted(c.times, [t0 + lag, t0 + w + lag], side="left")
        block = c.dff[i0:i1]  # type: ignore[index]
        cols = np.arange(n_units) if keep is None else np.nonzero(keep)[0]
        block = block[:, cols]
        stamps = c.times[i0:i1] - (t0 + lag)
        k = config.calcium_bin
        if k > 1 and block.shape[0]:
            starts = np.arange(0, block.shape[0], k)
            counts = np.diff(np.append(starts, block.shape[0])).astype(np.float64)
            block = (np.add.reduceat(block.astype(np.float64), starts, axis=0) / counts[:, None]).astype(np.float32)
            stamps = np.add.reduceat(stamps, starts) / counts
        n_frames = block.shape[0]
        units = np.tile(c.unit_index[cols], n_frames)
        rel = np.repeat(stamps.astype(np.float32), len(cols))
        values = block.reshape(-1)
        if config.calcium_noise > 0 and rng is not None:
            values = values + rng.normal(0.0, config.calcium_noise, values.shape).astype(np.float32)
    lo = np.maximum(c.q_start, t0)
    hi = np.minimum(c.q_end, t0 + w)
    overlap = hi - lo
    need = config.min_overlap * np.minimum(c.q_end - c.q_start, w)
    q = overlap >= need - 1e-9
    q_times = ((lo[q] + hi[q]) / 2 - t0).astype(np.float32)
    ids = c.q_id if c.q_id is not None else presentation_id(c.q_start)
    members = c.unit_index if keep is None else c.unit_index[keep]
    return units, rel, values, q_times, c.q_task[q], c.q_label[q], ids[q], overlap[q].astype(np.float32), members


def pack(windows: list[tuple], modality: list[int], session: list[int], window_s: float,
         pad: list[bool] | None = None, record: list[int] | None = None,
         calcium_lag_s: float = 0.0, calcium_bin: int = 1) -> dict[str, np.ndarray]:
    """Concatenate per-window tokens into the packed batch of docs/batch.md (numpy; torch later).
    ``record``: each window's (session_id, region) record index (``record_index``; the key is left out
    when None)."""
    n_in = np.array([len(w[0]) for w in windows], dtype=np.int64)
    n_out = np.array([len(w[3]) for w in windows], dtype=np.int64)
    cu_units = np.zeros(len(windows) + 1, dtype=np.int32)
    np.cumsum([len(w[8]) for w in windows], out=cu_units[1:])
    cu_in = np.zeros(len(windows) + 1, dtype=np.int32)
    cu_out = np.zeros(len(windows) + 1, dtype=np.int32)
    np.cumsum(n_in, out=cu_in[1:])
    np.cumsum(n_out, out=cu_out[1:])
    weights = np.ones(int(cu_out[-1]), dtype=np.float32)
    if pad is not None:
        weights[np.repeat(np.asarray(pad, dtype=bool), n_out)] = 0.0
    cat = np.concatenate
    out = {
        "input_unit_index": cat([w[0] for w in windows]).astype(np.int64, copy=False),
        "input_timestamps": cat([w[1] for w in windows]).astype(np.float32, copy=False),
        "input_values": cat([w[2] for w in windows]).astype(np.float32, copy=False),
        "input_cu_seqlens": cu_in,
        "modality": np.asarray(modality, dtype=np.int64),
        "session_index": np.asarray(session, dtype=np.int64),
        "output_timestamps": cat([w[3] for w in windows]).astype(np.float32, copy=False),
        "output_task_index": cat([w[4] for w in windows]).astype(np.int64, copy=False),
        "output_labels": cat([w[5] for w in windows]).astype(np.int64, copy=False),
        "output_weights": weights,
        "output_presentation": cat([w[6] for w in windows]).astype(np.int64, copy=False),
        "output_span": cat([w[7] for w in windows]).astype(np.float32, copy=False),
        "sample_unit_index": cat([w[8] for w in windows]).astype(np.int64, copy=False),
        "sample_unit_cu_seqlens": cu_units,
        "output_cu_seqlens": cu_out,
        "window_s": np.float32(window_s),
    }
    if calcium_lag_s:  # absent means 0 (batches without a lag are unchanged)
        out["calcium_lag_s"] = np.float32(calcium_lag_s)
    if MODALITY_INDEX["ophys"] in modality:  # batches holding OPhys windows say how they were binned (EPhys-only: as before)
        out["calcium_bin"] = np.int64(calcium_bin)
    if record is not None:
        out["record_index"] = np.asarray(record, dtype=np.int64)
    return out
