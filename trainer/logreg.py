"""The per-session linear decoder the papers compare against: logistic regression on presentation-aligned
activity, one model per (record, task), fit on the train split and scored on the test split.

Features of one stimulus presentation, from the chunk that holds its midpoint (the data a windowed model
sees; nothing from another split):
- EPhys: spike counts of every unit of the session (all its regions) in ``[start + latency, end + latency)``,
  square-root transformed (variance-stabilised Poisson counts);
- OPhys: mean dF/F of every ROI over ``[start, max(end, start + 0.75 s))``, the rise and the first part of
  the calcium decay.

The latency (EPhys, at a middle L2) and then the L2 strength are picked on the valid split, so the baseline never
sees the truth of a synthetic corpus and the test split stays untouched. Units absent from a chunk (e.g. a ROI
with NaN frames there) read as the train mean. The fit is full-batch L-BFGS on the multinomial
log-likelihood (torch; scikit-learn is not a dependency), standardised features, a bias per class.

Results are the papers' figure: accuracy per record (session x region: splits are drawn per record), then
averaged over records.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from shards import manifest
from shards.store import Store

LATENCIES_S = (0.0, 0.05, 0.1)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
OPHYS_MIN_SPAN_S = 0.75
TASKS = ("static_gratings", "drifting_gratings", "natural_scenes")


def _features_of_chunk(sample, task: str, columns: dict[str, int], latency: float) -> tuple[np.ndarray, np.ndarray]:
    """(features (P, U) with NaN for absent units, labels (P,)) of the presentations whose midpoint is in the chunk."""
    m = sample.meta
    st = m["stimuli"]
    names = np.asarray(st["task"], dtype=str)
    start, end = np.asarray(st["start"], np.float64), np.asarray(st["end"], np.float64)
    label = np.asarray(st["label"], np.int64)
    mid = (start + end) / 2
    keep = (names == task) & (label >= 0) & (mid >= m["t_start"]) & (mid < m["t_end"])
    start, end, label = start[keep], end[keep], label[keep]
    x = np.full((len(label), len(columns)), np.nan)
    cols = np.array([columns[str(u)] for u in m["units"]], dtype=np.int64)
    if m["modality"] == "ephys":
        t, u = sample.arrays["spike_times"], sample.arrays["spike_units"]
        n_units = len(m["units"])
        for i, (a, b) in enumerate(zip(start + latency, end + latency)):
            lo, hi = np.searchsorted(t, [a, b])
            x[i, cols] = np.sqrt(np.bincount(u[lo:hi], minlength=n_units))
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


def fit_logreg(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, steps: int = 60) -> tuple[torch.Tensor, ...]:
    """Multinomial logistic regression by L-BFGS; returns (mean, std, W, b) to apply with ``predict``."""
    mean = np.nanmean(x, 0) if len(x) else np.zeros(x.shape[1])
    mean = np.where(np.isfinite(mean), mean, 0.0)
    xz = np.where(np.isnan(x), mean, x)
    std = xz.std(0) + 1e-6
    xt = torch.tensor((xz - mean) / std, dtype=torch.float64)
    yt = torch.tensor(y)
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, yt) + l2 * (w ** 2).sum()
        loss.backward()
        return loss
    if len(y):
        opt.step(closure)
    return torch.tensor(mean), torch.tensor(std), w.detach(), b.detach()


def predict(model: tuple[torch.Tensor, ...], x: np.ndarray) -> np.ndarray:
    mean, std, w, b = model
    xz = np.where(np.isnan(x), mean.numpy(), x)
    return ((torch.tensor((xz - mean.numpy()) / std.numpy()) @ w + b).argmax(1)).numpy()


def logreg_record(samples: dict[str, list], columns: dict[str, int], task: str, n_classes: int,
                  modality: str) -> dict:
    """Test accuracy of the validation-picked (latency, L2) model, refit on train. {acc, n, latency, l2}.
    ``samples``: the record's decoded chunks per split; ``columns``: its units' feature columns."""
    # the latency with a middle L2 first, then the L2 at that latency: 3 + 4 fits instead of 12
    feats, scores = {}, {}
    for latency in (LATENCIES_S if modality == "ephys" else (0.0,)):
        feats[latency] = {sp: record_features(samples[sp], columns, task, latency) for sp in samples}
        (xtr, ytr), (xva, yva) = feats[latency]["train"], feats[latency]["valid"]
        if len(ytr) and len(yva):
            scores[latency] = float((predict(fit_logreg(xtr, ytr, n_classes, L2_GRID[2]), xva) == yva).mean())
    latency = max(scores, key=scores.get) if scores else 0.0
    best = (-1.0, latency, L2_GRID[2])
    (xtr, ytr), (xva, yva) = feats[latency]["train"], feats[latency]["valid"]
    for l2 in L2_GRID if len(ytr) and len(yva) else ():
        acc = float((predict(fit_logreg(xtr, ytr, n_classes, l2), xva) == yva).mean())
        if acc > best[0]:
            best = (acc, latency, l2)
    _, latency, l2 = best
    (xtr, ytr), (xte, yte) = feats[latency]["train"], feats[latency]["test"]
    if not len(yte) or not len(ytr):
        return {"acc": float("nan"), "n": 0, "latency": latency, "l2": l2}
    acc = float((predict(fit_logreg(xtr, ytr, n_classes, l2), xte) == yte).mean())
    return {"acc": acc, "n": int(len(yte)), "latency": latency, "l2": l2}


def logreg_baseline(store_uri: str, sessions: list[str], n_classes: dict[str, int]) -> dict:
    """{modality: {task: mean over records of test accuracy}} plus per-record rows under "record"
    ("session/region" keys) for the records of ``sessions``."""
    store = Store(store_uri)
    tables = manifest.load(store)
    st = tables.sessions.to_pandas()
    st = st[st.session_id.isin(sessions)]
    chunks, units = tables.chunks.to_pandas(), tables.units.to_pandas()  # once, not per record and task
    per: dict = {}
    rows = {}
    for sid, region, mod in zip(st.session_id, st.region, st.modality):
        key = f"{sid}/{region}"
        rows[key] = {}
        mine = units[(units.session_id == sid) & (units.region == region)]
        # a chunk names its units by the part of unit_id after "session/" (unique within the session)
        columns = {k: i for i, k in enumerate(mine.unit_id.str.split("/", n=1).str[1])}
        samples = {sp: list(manifest.record_samples(store, chunks, sid, region, sp))
                   for sp in ("train", "valid", "test")}
        for task in TASKS:  # the record's chunks are read once for its three tasks
            r = logreg_record(samples, columns, task, n_classes[task], mod)
            rows[key][task] = r
            if r["n"]:
                per.setdefault(mod, {}).setdefault(task, []).append(r["acc"])
    out = {mod: {t: float(np.mean(v)) for t, v in tasks.items()} for mod, tasks in per.items()}
    out["record"] = rows
    return out
