"""Presentation-aligned features of one record, and the loop the per-record decoders share.

The per-session decoders the model is compared against (``trainer.logreg``, ``trainer.naive_bayes``) read the
same thing: for every stimulus presentation whose midpoint lies in a chunk of the record's split, from that chunk
alone (the data a windowed model sees; nothing from another split),
- EPhys: spike counts of every unit of the record in ``[start + latency, end + latency)``;
- OPhys: mean dF/F of every ROI over ``[start, max(end, start + 0.75 s))``, the rise and the first part of
  the calcium decay.
Units absent from a chunk (e.g. a ROI with NaN frames there) are NaN; each decoder says what it does with them.

Each decoder has one free parameter (a regularisation strength) and, for EPhys, the latency; both are picked on
the valid split (the latency at the grid's middle parameter, then the parameter at that latency: 3 + 4 fits
instead of 12), so no decoder sees the truth of a synthetic corpus and the test split stays untouched. Results
are the papers' figure: accuracy per record (session x region: splits are drawn per record), then averaged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shards import manifest
from shards.schema import TASKS as SCHEMA_TASKS
from shards.store import Store

EPHYS_LATENCY_S = 0.05  # a typical visual response latency: the one to use when a decoder cannot pick
LATENCIES_S = (0.0, EPHYS_LATENCY_S, 0.1)  # the latencies a per-session decoder picks among on the valid split
OPHYS_MIN_SPAN_S = 0.75
TASKS = tuple(SCHEMA_TASKS)  # the store's tasks, in its order

# fit(x_train, y_train, n_classes, param) -> model; predict(model, x) -> predicted classes
Fit = Callable[[np.ndarray, np.ndarray, int, float], object]
Predict = Callable[[object, np.ndarray], np.ndarray]


def _presentations(sample, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, label) of the chunk's labelled presentations of ``task`` whose midpoint is in the chunk."""
    m = sample.meta
    st = m["stimuli"]
    names = np.asarray(st["task"], dtype=str)
    start, end = np.asarray(st["start"], np.float64), np.asarray(st["end"], np.float64)
    label = np.asarray(st["label"], np.int64)
    mid = (start + end) / 2
    keep = (names == task) & (label >= 0) & (mid >= m["t_start"]) & (mid < m["t_end"])
    return start[keep], end[keep], label[keep]


def record_durations(samples: list, task: str) -> np.ndarray:
    """Each presentation's length (s), in :func:`record_features`' order (an EPhys count's window)."""
    spans = []
    for sample in samples:
        start, end, _ = _presentations(sample, task)
        spans.append(end - start)
    return np.concatenate(spans) if spans else np.zeros(0)


def _features_of_chunk(sample, task: str, columns: dict[str, int], latency: float) -> tuple[np.ndarray, np.ndarray]:
    """(features (P, U) with NaN for absent units, labels (P,)) of the presentations whose midpoint is in the chunk."""
    m = sample.meta
    start, end, label = _presentations(sample, task)
    x = np.full((len(label), len(columns)), np.nan)
    cols = np.array([columns[str(u)] for u in m["units"]], dtype=np.int64)
    if m["modality"] == "ephys":
        t, u = sample.arrays["spike_times"], sample.arrays["spike_units"]
        n_units = len(m["units"])
        for i, (a, b) in enumerate(zip(start + latency, end + latency)):
            lo, hi = np.searchsorted(t, [a, b])
            x[i, cols] = np.bincount(u[lo:hi], minlength=n_units)
    else:
        ft, dff = sample.arrays["frame_times"], sample.arrays["dff"]
        for i, (a, b) in enumerate(zip(start, np.maximum(end, start + OPHYS_MIN_SPAN_S))):
            lo, hi = np.searchsorted(ft, [a, b])
            if hi > lo:
                x[i, cols] = dff[lo:hi].mean(0)
    return x, label


def record_features(samples: list, columns: dict[str, int], task: str, latency: float) -> tuple[np.ndarray, np.ndarray]:
    """Presentation features and labels of one record's split (its decoded chunks; columns: its units)."""
    xs, ys = [], []
    for sample in samples:
        x, y = _features_of_chunk(sample, task, columns, latency)
        xs.append(x)
        ys.append(y)
    if not xs:
        return np.zeros((0, len(columns))), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def pick_and_score(samples: dict[str, list], columns: dict[str, int], task: str, n_classes: int, modality: str,
                   fit: Fit, predict: Predict, grid: Sequence[float]) -> dict:
    """Test accuracy of the valid-picked (latency, parameter) decoder, refit on train: {acc, n, latency, param}.
    ``samples``: the record's decoded chunks per split; ``columns``: its units' feature columns."""
    def acc(model, x, y) -> float:
        return float((predict(model, x) == y).mean())

    middle = grid[len(grid) // 2]
    feats, scores = {}, {}
    for latency in (LATENCIES_S if modality == "ephys" else (0.0,)):
        feats[latency] = {sp: record_features(samples[sp], columns, task, latency) for sp in samples}
        (xtr, ytr), (xva, yva) = feats[latency]["train"], feats[latency]["valid"]
        if len(ytr) and len(yva):
            scores[latency] = acc(fit(xtr, ytr, n_classes, middle), xva, yva)
    latency = max(scores, key=scores.get) if scores else 0.0
    best = (-1.0, latency, middle)
    (xtr, ytr), (xva, yva) = feats[latency]["train"], feats[latency]["valid"]
    for param in grid if len(ytr) and len(yva) else ():
        a = acc(fit(xtr, ytr, n_classes, param), xva, yva)
        if a > best[0]:
            best = (a, latency, param)
    _, latency, param = best
    (xtr, ytr), (xte, yte) = feats[latency]["train"], feats[latency]["test"]
    if not len(yte) or not len(ytr):
        return {"acc": float("nan"), "n": 0, "latency": latency, "param": param}
    return {"acc": acc(fit(xtr, ytr, n_classes, param), xte, yte), "n": int(len(yte)), "latency": latency,
            "param": param}


RecordFn = Callable[[dict[str, list], dict[str, int], str, int, str], dict]


@dataclass
class Record:
    """One record (session x region) of a store, its chunks decoded: what the per-record readers loop over."""

    session: str
    region: str
    modality: str
    unit_ids: list[str]  # the record's units, in column order
    columns: dict[str, int]  # a chunk's unit name (unit_id after "session/") -> column
    samples: dict[str, list]  # split -> its decoded chunks, in time order


def iter_records(store_uri: str, sessions: Iterable[str], splits: Sequence[str],
                 chunk_mask: Callable[[pd.DataFrame], np.ndarray] | None = None) -> Iterator[Record]:
    """Every record of ``sessions`` in the store, with the chunks of ``splits`` read once (``chunk_mask``: keep
    only the chunks it marks, e.g. the train chunks a run trains on)."""
    store = Store(store_uri)
    tables = manifest.load(store)
    st = tables.sessions.to_pandas()
    st = st[st.session_id.isin(set(sessions))]
    chunks, units = tables.chunks.to_pandas(), tables.units.to_pandas()  # once, not per record and task
    if chunk_mask is not None:
        chunks = chunks[chunk_mask(chunks)]
    for sid, region, mod in zip(st.session_id, st.region, st.modality):
        mine = units[(units.session_id == sid) & (units.region == region)]
        # a chunk names its units by the part of unit_id after "session/" (unique within the session)
        columns = {k: i for i, k in enumerate(mine.unit_id.str.split("/", n=1).str[1])}
        samples = {sp: list(manifest.record_samples(store, chunks, sid, region, sp)) for sp in splits}
        yield Record(str(sid), str(region), str(mod), [str(u) for u in mine.unit_id], columns, samples)


def per_record(store_uri: str, sessions: list[str], n_classes: dict[str, int],
               decoders: dict[str, RecordFn]) -> dict[str, dict]:
    """For each named decoder, {modality: {task: mean over records of test accuracy}} plus per-record rows
    under "record" ("session/region" keys) for the records of ``sessions``. ``decoder(samples, columns, task,
    n_classes, modality)`` scores one record and task (e.g. with ``pick_and_score``); every record's chunks are
    read once for all decoders and tasks."""
    per: dict = {name: {} for name in decoders}
    rows: dict = {name: {} for name in decoders}
    for rec in iter_records(store_uri, sessions, ("train", "valid", "test")):
        sid, region, mod, columns, samples = rec.session, rec.region, rec.modality, rec.columns, rec.samples
        key = f"{sid}/{region}"
        for name, decoder in decoders.items():
            rows[name][key] = {}
            for task in TASKS:
                r = decoder(samples, columns, task, n_classes[task], mod)
                rows[name][key][task] = r
                if r["n"]:
                    per[name].setdefault(mod, {}).setdefault(task, []).append(r["acc"])
    return {name: {**{mod: {t: float(np.mean(v)) for t, v in tasks.items()} for mod, tasks in per[name].items()},
                   "record": rows[name]} for name in decoders}
