"""Metrics per task, per modality and per session, summed over ranks: training logs and validation.

A ``Tally`` adds up, for every (modality, session, task), the weighted number of labelled queries,
the correct ones, the loss, and for regression tasks the sums R² needs; at validation it also
fills one confusion matrix per (modality, task). Tallies are plain float64 tensors, so summing
over ranks is one ``all_reduce`` each, and every rank ends up with the same numbers (the same
early-stopping decision, without a broadcast). Padding windows of the evaluation split carry
``output_weights = 0`` and count nowhere.

The score that picks the best checkpoint and drives early stopping is the papers' (App. B):
the average over modalities of each modality's mean accuracy over its classification tasks
(R² for regression-only modalities).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.config import MODALITIES

# fields of a tally row (regression: sums over target elements, for a pooled R² over the task's dimensions)
N, CORRECT, LOSS, SSE, SUM_Y, SUM_Y2, N_Y = range(7)
FIELDS = 7


def sample_of_query(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    cu = batch["output_cu_seqlens"].long()
    return torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), torch.diff(cu),
                                   output_size=int(cu[-1]))


class Tally:
    """Sums over queries, by (modality, session, task). ``session_ids`` name the sessions (store order)."""

    def __init__(self, tasks, session_ids: list[str], *, confusion: bool = False, device="cpu"):
        self.tasks, self.session_ids = tuple(tasks), list(session_ids)
        self.sums = torch.zeros(len(MODALITIES), max(1, len(session_ids)), len(self.tasks), FIELDS,
                                dtype=torch.float64, device=device)
        self.confusion = {t.name: torch.zeros(len(MODALITIES), t.out_dim, t.out_dim, dtype=torch.float64, device=device)
                          for t in self.tasks if t.kind == "classification"} if confusion else {}
        self.tokens = 0
        self.samples = 0

    @torch.no_grad()
    def add(self, out: dict[str, Any], batch: dict[str, torch.Tensor]) -> None:
        """One forward output and its batch (the store's session indices, before any vocabulary remap)."""
        q_sample = sample_of_query(batch)
        weights = batch["output_weights"].float()
        n_sessions = self.sums.shape[1]
        for k, task in enumerate(self.tasks):
            rows = out["query_index"][task.name]
            if rows.numel() == 0:
                continue
            logits = out["logits"][task.name].float()
            s = q_sample[rows]
            mod, sess = batch["modality"][s], batch["session_index"][s].clamp(max=n_sessions - 1)
            w = weights[rows]
            vals = torch.zeros(len(rows), FIELDS, device=logits.device, dtype=torch.float64)
            if task.kind == "classification":
                labels = batch["output_labels"][rows]
                w = w * (labels >= 0)
                pred = logits.argmax(-1)
                vals[:, CORRECT] = ((pred == labels).float() * w).double()
                vals[:, LOSS] = (F.cross_entropy(logits, labels.clamp_min(0), reduction="none") * w).double()
                if task.name in self.confusion:
                    keep = w > 0
                    flat = (mod[keep] * task.out_dim + labels[keep]) * task.out_dim + pred[keep]
                    self.confusion[task.name].view(-1).index_add_(0, flat, w[keep].double())
            else:
                y = batch["output_values"][rows].float().reshape(logits.shape)
                se = ((logits - y) ** 2).sum(-1)
                vals[:, LOSS] = (se / y.shape[-1] * w).double()
                vals[:, SSE] = (se * w).double()
                vals[:, SUM_Y] = (y.sum(-1) * w).double()
                vals[:, SUM_Y2] = ((y ** 2).sum(-1) * w).double()
                vals[:, N_Y] = (w * y.shape[-1]).double()
            vals[:, N] = w.double()
            flat = (mod * n_sessions + sess) * len(self.tasks) + k
            self.sums.view(-1, FIELDS).index_add_(0, flat, vals)
        self.tokens += int(batch["input_cu_seqlens"][-1])
        self.samples += int(batch["modality"].numel())

    def all_reduce(self) -> "Tally":
        """Sum over ranks (in place); a no-op without torch.distributed."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            counts = torch.tensor([self.tokens, self.samples], dtype=torch.float64, device=self.sums.device)
            for t in [self.sums, counts, *self.confusion.values()]:
                dist.all_reduce(t)
            self.tokens, self.samples = int(counts[0]), int(counts[1])
        return self

    # ---- read-outs ---------------------------------------------------------------------------------
    @staticmethod
    def _metrics(v: torch.Tensor, kind: str) -> dict[str, float]:
        """v: (FIELDS,) sums of one group -> acc or r2, loss, n."""
        n = float(v[N])
        out = {"n": n, "loss": float(v[LOSS]) / n if n else math.nan}
        if kind == "classification":
            out["acc"] = float(v[CORRECT]) / n if n else math.nan
        else:
            n_y = float(v[N_Y])
            total = float(v[SUM_Y2]) - float(v[SUM_Y]) ** 2 / n_y if n_y else 0.0  # about the pooled mean
            out["r2"] = 1.0 - float(v[SSE]) / total if total > 0 else math.nan
        return out

    def summary(self) -> dict[str, Any]:
        """Nested metrics: score, per modality (per task), per session (per task)."""
        res: dict[str, Any] = {"modality": {}, "session": {}}
        per_mod = self.sums.sum(1)  # (M, T, F)
        scores = []
        for m, mod in enumerate(MODALITIES):
            if per_mod[m, :, N].sum() <= 0:
                continue
            tasks = {t.name: self._metrics(per_mod[m, k], t.kind) for k, t in enumerate(self.tasks)
                     if per_mod[m, k, N] > 0}
            all_n = per_mod[m, :, N].sum()
            entry = {"loss": float(per_mod[m, :, LOSS].sum() / all_n), "n": float(all_n), "tasks": tasks}
            primary = [v["acc"] for v in tasks.values() if "acc" in v] or [v["r2"] for v in tasks.values()]
            entry["score"] = sum(primary) / len(primary)
            scores.append(entry["score"])
            res["modality"][mod] = entry
        for s, sid in enumerate(self.session_ids):
            for m, mod in enumerate(MODALITIES):
                v = self.sums[m, s]
                if v[:, N].sum() <= 0:
                    continue
                res["session"][sid] = {"modality": mod, "tasks": {t.name: self._metrics(v[k], t.kind)
                                                                  for k, t in enumerate(self.tasks) if v[k, N] > 0}}
        res["score"] = sum(scores) / len(scores) if scores else math.nan
        return res

    def scalars(self, prefix: str, sessions: bool = False) -> dict[str, float]:
        """Flat ``{prefix}/acc/{modality}/{task}``-style scalars for TensorBoard and Ray."""
        s = self.summary()
        out = {f"{prefix}/score": s["score"]}
        for mod, e in s["modality"].items():
            out[f"{prefix}/loss/{mod}"] = e["loss"]
            out[f"{prefix}/score/{mod}"] = e["score"]
            for task, v in e["tasks"].items():
                out[f"{prefix}/loss/{mod}/{task}"] = v["loss"]
                for key in ("acc", "r2"):
                    if key in v:
                        out[f"{prefix}/{key}/{mod}/{task}"] = v[key]
        if sessions:
            for sid, e in s["session"].items():
                for task, v in e["tasks"].items():
                    for key in ("acc", "r2"):
                        if key in v:
                            out[f"{prefix}_session/{sid}/{key}/{task}"] = v[key]
        return out

    def confusion_matrices(self) -> dict[str, dict[str, Any]]:
        """{task: {modality: (C, C) numpy counts, rows = true class}} for modalities with queries."""
        res = {}
        for task, mats in self.confusion.items():
            per = {mod: mats[m].cpu().numpy() for m, mod in enumerate(MODALITIES) if mats[m].sum() > 0}
            if per:
                res[task] = per
        return res


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, *, session_ids: list[str], device, to_model=lambda b: b,
             max_batches: int | None = None) -> Tally:
    """Run the model (in eval mode, no DDP) over one pass of an evaluation loader; sum over ranks.
    Every rank runs the same number of batches (the evaluation plan is padded to whole steps)."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    tally = Tally(net.config.tasks, session_ids, confusion=True, device=device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        tally.add(net(to_model(batch)), batch)
    net.train(was_training)
    return tally.all_reduce()
