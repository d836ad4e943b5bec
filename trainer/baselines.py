"""The per-session MLP baseline of the papers' comparison: no pretraining, no sharing across sessions.

For each session, a window's activity is binned per unit (``bins`` bins: spike counts for EPhys,
mean dF/F for OPhys); a query's features are that (units x bins) matrix, flattened, plus a one-hot
of the bin holding the query's time. One MLP per session (shared hidden layer, one linear head per
task) trains with AdamW on the session's train split and is scored on its test split with the same
``Tally`` as the transformer, so the numbers are directly comparable. Runs in this process (no Ray):
a few small dense layers per session.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from shards.atomic import atomic_path
from shards.stream.dataset import MixtureStream
from shards.stream.loader import StreamLoader
from trainer.config import TrainConfig
from trainer.model.config import ModelConfig
from trainer.model.packing import segment_ids
from trainer.sessions import mix_of_session
from trainer.tally import Tally


class SessionMLP(nn.Module):
    """features (Q, F) -> logits per task. Args (keyword-only): n_features, hidden, tasks, dropout."""

    def __init__(self, *, n_features: int, hidden: int, tasks, dropout: float = 0.2):
        super().__init__()
        self.tasks = tuple(tasks)
        self.body = nn.Sequential(nn.Linear(n_features, hidden), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout))
        self.heads = nn.ModuleDict({t.name: nn.Linear(hidden, t.out_dim) for t in self.tasks})

    def forward(self, x: torch.Tensor, task_index: torch.Tensor) -> dict:
        """Same output layout as MultiModalPOYO.forward: logits and query rows per task."""
        h = self.body(x)
        logits, index = {}, {}
        for k, t in enumerate(self.tasks):
            rows = (task_index == k).nonzero().squeeze(1)
            logits[t.name], index[t.name] = self.heads[t.name](h[rows]), rows
        return {"logits": logits, "query_index": index}


def features(batch: dict, unit_col: torch.Tensor, n_cols: int, bins: int, window_s: float) -> torch.Tensor:
    """(Q, n_cols * bins + bins): each query's window activity per (unit, bin), and its time bin."""
    cu = batch["input_cu_seqlens"].long()
    n = len(cu) - 1
    sample = segment_ids(cu)
    b = (batch["input_timestamps"] / window_s * bins).long().clamp(0, bins - 1)
    col = unit_col[batch["input_unit_index"]]
    flat = (sample * n_cols + col) * bins + b
    ephys = batch["modality"][sample] == 0
    value = torch.where(ephys, torch.ones_like(batch["input_values"]), batch["input_values"])
    total = torch.zeros(n * n_cols * bins).index_add_(0, flat, value)
    count = torch.zeros(n * n_cols * bins).index_add_(0, flat, torch.ones_like(value))
    ophys = (batch["modality"] == 1).repeat_interleave(n_cols * bins)
    act = torch.where(ophys, total / count.clamp_min(1), total).view(n, n_cols * bins)  # mean dF/F | spike count
    q_sample = segment_ids(batch["output_cu_seqlens"].long())
    q_bin = (batch["output_timestamps"] / window_s * bins).long().clamp(0, bins - 1)
    return torch.cat([act[q_sample], F.one_hot(q_bin, bins).float()], 1)


def run_mlp_baseline(cfg: TrainConfig, *, bins: int = 8, hidden: int = 128, lr: float = 1e-3) -> dict:
    """Train and test one MLP per session of ``cfg.sessions_include``; writes RUN/metrics.json."""
    cfg = cfg.absolute()
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tasks = ModelConfig.small().tasks
    results, t0 = {}, time.time()
    total: Tally | None = None
    for sid in cfg.sessions_include:
        train, test = (MixtureStream(dataclasses.replace(cfg.stream_config(split), sessions_include=(sid,),
                                                         mix=mix_of_session(cfg.shards, sid)))
                       for split in ("train", "test"))
        units = sorted(u for u, _ in train.vocab.units.items() if u.startswith(sid + "/"))
        unit_col = torch.zeros(len(train.vocab.units), dtype=torch.int64)
        for c, u in enumerate(units):
            unit_col[train.vocab.units[u]] = c
        n_cols = max(1, len(units))
        model = SessionMLP(n_features=n_cols * bins + bins, hidden=hidden, tasks=tasks)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        loader = StreamLoader(train, num_workers=0)
        for _ in range(cfg.epochs):
            for batch in loader:
                x = features(batch, unit_col, n_cols, bins, cfg.window_s)
                out = model(x, batch["output_task_index"])
                loss = mlp_loss(out, batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        tally = Tally(tasks, sorted(train.vocab.sessions, key=train.vocab.sessions.get),
                      record_ids=sorted(train.vocab.records, key=train.vocab.records.get), per_presentation=True)
        with torch.no_grad():
            for batch in StreamLoader(test, num_workers=0):
                tally.add(model(features(batch, unit_col, n_cols, bins, cfg.window_s), batch["output_task_index"]),
                          batch)
        mine = {name: e for name, e in tally.summary()["record"].items() if e["session"] == sid}
        results.update(mine)
        if total is None:
            total = tally
        else:
            total.merge(tally)
        for name, e in mine.items() or [(sid, {"tasks": {}})]:
            print(f"mlp {name}: " + ", ".join(f"{t} {v['acc']:.3f}" for t, v in e["tasks"].items()), flush=True)
    summary = total.summary() if total is not None else {}
    metrics = {"status": "finished", "mode": "mlp", "step": 0, "total_steps": 0, "epochs": cfg.epochs,
               "train": {"first_loss": float("nan"), "last_loss": float("nan")}, "final": None, "best": None,
               "test": summary, "seconds": time.time() - t0}
    with atomic_path(os.path.join(cfg.out, "metrics.json")) as tmp, open(tmp, "w") as fh:
        json.dump(metrics, fh, indent=1)
    return metrics


def mlp_loss(out: dict, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the labelled queries of all tasks."""
    losses, n = [], 0
    for name, rows in out["query_index"].items():
        labels = batch["output_labels"][rows]
        keep = (labels >= 0) & (batch["output_weights"][rows] > 0)
        if keep.any():
            losses.append(F.cross_entropy(out["logits"][name][keep], labels[keep], reduction="sum"))
            n += int(keep.sum())
    return sum(losses) / max(n, 1) if losses else torch.zeros((), requires_grad=True)

