"""Metrics per task, per modality and per session or record, summed over ranks: training logs and validation.

Headline (evaluation, ``per_presentation=True``; the papers' protocol, POYO+ and its multi-modal
successor): one prediction per stimulus presentation, accuracy per record, then the mean over
records. A record is one (session_id, region) row of sessions.parquet (an EPhys session holds one
per brain region; an OPhys session one): the splits are drawn per record (``ingest/splits.py``), so
one presentation may be test in one region's record and train in another's (the ideal observer,
``ingest/synth/ideal.py``, scores per record too). The summary's ``record`` section is keyed
``"session_id/region"``; the pooled figures stay per session.
1. Evaluation windows overlap (``shards.stream.plan.plan_eval``: half a window apart), so one
   presentation is queried by one or more windows; every query carries the presentation's id
   (``output_presentation``, docs/batch.md).
2. For each (modality, record, task, presentation) the logits of every window that queries it
   are averaged (weighted by ``output_weights``, so padding windows count nowhere). The mean of
   the raw logits, not of log-softmax: the two differ per window by a class-independent constant
   (the window's log-sum-exp), so their argmax is the same; raw logits are what torch_brain's
   stitching averages and need no extra pass. Regression tasks average the predictions.
3. One argmax per presentation; a record's accuracy is the mean over its presentations (R²
   over its presentations for regression tasks).
4. A (modality, task)'s accuracy is the mean over its records; the score is the mean over
   modalities of each modality's mean accuracy over its classification tasks (R² for
   regression-only modalities), as in the papers' App. B. It picks ``model_best.pt`` and
   drives early stopping.
The windows of one record are the record's own (its region's units): those of the other regions of
its session that query the same presentation are averaged into their own records' predictions.
Records are ``record_index`` of the batch (docs/batch.md), named by ``record_ids``; a batch without
it (hand-made test batches) counts each session as one record.

Pooled (the ``pooled`` entry of an evaluation summary, TensorBoard ``val/acc_pooled/...``; the
whole summary of a training tally): every labelled query counts once per window that holds it.
A ``Tally`` adds up, for every (modality, session, task), the weighted number of labelled
queries, the correct ones, the loss, and for regression tasks the sums R² needs; plain float64
tensors, so summing over ranks is one ``all_reduce`` each. Losses are always pooled per query
(the training objective).

Ranks: the presentations of one record may be split over ranks (windows are dealt out in
turn), so ``all_reduce`` also gathers every rank's per-presentation sums (``all_gather_object``
of CPU tensors) and merges them in rank order; every rank ends up with the same numbers (the
same early-stopping decision, without a broadcast). ``Tally.merge`` is the same merge for
tallies in one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shards.schema import MODALITIES
from trainer.model.packing import segment_ids

# fields of a tally row (regression: sums over target elements, for a pooled R² over the task's dimensions)
N, CORRECT, LOSS, SSE, SUM_Y, SUM_Y2, N_Y = range(7)
FIELDS = 7
# columns of a presentation key
KEY_MODALITY, KEY_RECORD, KEY_PRESENTATION = range(3)


@dataclass
class Presentations:
    """Per-presentation sums of one task. Row p: ``keys[p]`` = (modality, record, presentation id),
    ``weight[p]`` = the summed weights of the queries (windows) that asked for it, ``logits[p]`` =
    their weighted sum of logits (regression: predictions), ``target[p]`` = their weighted sum of
    targets (classification: the label, one column). Rows may repeat a key until ``compact``."""

    keys: torch.Tensor  # int64 (P, 3)
    weight: torch.Tensor  # float64 (P,)
    logits: torch.Tensor  # float64 (P, C)
    target: torch.Tensor  # float64 (P, D)

    @classmethod
    def cat(cls, parts: list[Presentations]) -> Presentations:
        """All rows of parts, in order, one row per key (``compact``)."""
        dev = parts[0].keys.device
        return cls(*(torch.cat([getattr(p, f).to(dev) for p in parts]) for f in ("keys", "weight", "logits", "target"))
                   ).compact()

    def compact(self) -> Presentations:
        """One row per key (sorted by key), sums added; the result does not depend on row order beyond
        float rounding."""
        if not len(self.keys):
            return self
        keys, inv = torch.unique(self.keys, dim=0, return_inverse=True)

        def add(x: torch.Tensor) -> torch.Tensor:
            return torch.zeros((len(keys), *x.shape[1:]), dtype=x.dtype, device=x.device).index_add_(0, inv, x)
        return Presentations(keys, add(self.weight), add(self.logits), add(self.target))

    def to(self, device) -> Presentations:
        return Presentations(self.keys.to(device), self.weight.to(device), self.logits.to(device),
                             self.target.to(device))


class Tally:
    """Sums over queries, by (modality, session, task); with ``per_presentation`` also the sums per
    presentation (by modality, record, task) the headline needs. ``session_ids`` name the sessions (store
    order), ``record_ids`` the (session_id, region) records (``Vocab.records`` in index order); without
    ``record_ids`` each session is one record (region None)."""

    def __init__(self, tasks, session_ids: list[str], *, record_ids: list[tuple[str, str]] | None = None,
                 confusion: bool = False, per_presentation: bool = False, device="cpu"):
        self.tasks, self.session_ids = tuple(tasks), list(session_ids)
        self.record_ids: list[tuple[str, str | None]] = ([tuple(r) for r in record_ids] if record_ids is not None
                                                         else [(sid, None) for sid in self.session_ids])
        self.n_records = max(1, len(self.record_ids))
        self.sums = torch.zeros(len(MODALITIES), max(1, len(session_ids)), len(self.tasks), FIELDS,
                                dtype=torch.float64, device=device)
        self.confusion = {t.name: torch.zeros(len(MODALITIES), t.out_dim, t.out_dim, dtype=torch.float64, device=device)
                          for t in self.tasks if t.kind == "classification"} if confusion else {}
        self.per_presentation = per_presentation
        self._parts: dict[str, list[Presentations]] = {t.name: [] for t in self.tasks}
        self._n_parts = 0
        self._anonymous = 0  # ids handed to queries of batches without output_presentation
        self.tokens = 0
        self.samples = 0

    @torch.no_grad()
    def add(self, out: dict[str, Any], batch: dict[str, torch.Tensor]) -> None:
        """One forward output and its batch (the store's session indices, before any vocabulary remap)."""
        q_sample = segment_ids(batch["output_cu_seqlens"].long())
        weights = batch["output_weights"].float()
        n_sessions = self.sums.shape[1]
        presentation = record = None
        if self.per_presentation:
            presentation = batch.get("output_presentation")
            if presentation is None:  # hand-made batches: every query is its own presentation
                n_q = len(weights)
                presentation = -1 - torch.arange(self._anonymous, self._anonymous + n_q, device=weights.device)
                self._anonymous += n_q
            record = batch.get("record_index")
            if record is None:  # hand-made batches: one record per session
                record = batch["session_index"]
            record = record.clamp(max=self.n_records - 1)
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
                target = labels[:, None].double()
            else:
                y = batch["output_values"][rows].float().reshape(logits.shape)
                se = ((logits - y) ** 2).sum(-1)
                vals[:, LOSS] = (se / y.shape[-1] * w).double()
                vals[:, SSE] = (se * w).double()
                vals[:, SUM_Y] = (y.sum(-1) * w).double()
                vals[:, SUM_Y2] = ((y ** 2).sum(-1) * w).double()
                vals[:, N_Y] = (w * y.shape[-1]).double()
                target = y.double()
            vals[:, N] = w.double()
            flat = (mod * n_sessions + sess) * len(self.tasks) + k
            self.sums.view(-1, FIELDS).index_add_(0, flat, vals)
            if presentation is not None:
                keep = w > 0
                ww = w[keep].double()
                keys = torch.stack([mod[keep], record[s][keep], presentation[rows][keep]], 1).long()
                self._parts[task.name].append(Presentations(keys, ww, logits[keep].double() * ww[:, None],
                                                            target[keep] * ww[:, None]))
        if presentation is not None:
            self._n_parts += 1
            if self._n_parts % 256 == 0:  # bound the memory of a long evaluation
                self._compact()
        self.tokens += int(batch["input_cu_seqlens"][-1])
        self.samples += int(batch["modality"].numel())

    # ---- per-presentation tables ---------------------------------------------------------------------
    def _compact(self) -> None:
        for name, parts in self._parts.items():
            if len(parts) > 1:
                self._parts[name] = [Presentations.cat(parts)]

    def presentations(self, task: str) -> Presentations | None:
        """The per-presentation sums of one task (one row per presentation), or None when there are none."""
        parts = self._parts.get(task) or []
        if not parts:
            return None
        table = Presentations.cat(parts)
        self._parts[task] = [table]
        return table if len(table.keys) else None

    def merge(self, other: Tally) -> Tally:
        """Add another tally of the same tasks and sessions (another rank's share, say) in place."""
        self.sums += other.sums.to(self.sums.device)
        for name, mat in other.confusion.items():
            if name in self.confusion:
                self.confusion[name] += mat.to(self.confusion[name].device)
        for name, parts in other._parts.items():
            self._parts.setdefault(name, []).extend(parts)
        self._compact()
        self.tokens += other.tokens
        self.samples += other.samples
        return self

    def all_reduce(self) -> Tally:
        """Sum over ranks (in place); a no-op without torch.distributed. Per-presentation sums are
        gathered and merged in rank order, so every rank holds the same tables."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            counts = torch.tensor([self.tokens, self.samples], dtype=torch.float64, device=self.sums.device)
            for t in [self.sums, counts, *self.confusion.values()]:
                dist.all_reduce(t)
            self.tokens, self.samples = int(counts[0]), int(counts[1])
            if self.per_presentation:
                self._compact()
                mine = {name: [p.to("cpu") for p in parts] for name, parts in self._parts.items()}
                every: list = [None] * dist.get_world_size()
                dist.all_gather_object(every, mine)
                dev = self.sums.device
                for name in self._parts:
                    parts = [p for rank_parts in every for p in rank_parts.get(name, [])]
                    self._parts[name] = [Presentations.cat(parts).to(dev)] if parts else []
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

    def pooled_summary(self) -> dict[str, Any]:
        """Per query (every window that holds a presentation counts it): score, per modality (per task),
        per session (per task)."""
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
            entry["score"] = _primary(tasks)
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

    def record_name(self, r: int) -> str:
        """``"session_id/region"`` of record r (the session id alone for a record without a region)."""
        sid, region = self.record_ids[r] if r < len(self.record_ids) else (str(r), None)
        return sid if region is None else f"{sid}/{region}"

    def _per_record(self, task, table: Presentations) -> dict[tuple[int, int], dict[str, float]]:
        """{(modality, record): {"acc" | "r2", "n"}} over the presentations of one task."""
        mean = table.logits / table.weight[:, None]  # the presentation's mean logits (or prediction)
        target = table.target / table.weight[:, None]
        group = table.keys[:, KEY_MODALITY] * self.n_records + table.keys[:, KEY_RECORD]
        res = {}
        for g in torch.unique(group).tolist():
            sel = group == g
            n = int(sel.sum())
            key = (g // self.n_records, g % self.n_records)
            if task.kind == "classification":
                correct = mean[sel].argmax(-1) == target[sel, 0].round().long()
                res[key] = {"acc": float(correct.double().mean()), "n": n}
            else:
                y, pred = target[sel], mean[sel]
                total = float(((y - y.mean()) ** 2).sum())  # about the record's mean of the task's elements
                res[key] = {"r2": 1.0 - float(((pred - y) ** 2).sum()) / total if total > 0 else math.nan, "n": n}
        return res

    def summary(self) -> dict[str, Any]:
        """Nested metrics. With ``per_presentation``: the headline (module docstring) as ``score``;
        ``modality``: {mod: {score, n, tasks: {task: {acc | r2 (mean over records), n (presentations),
        records}}}}; ``record``: {"session_id/region": {session, region, modality, tasks: {task: {acc | r2,
        n}}}}; and the per-query figures (per modality and per session) under ``pooled``. Without
        (training tallies): the pooled summary itself."""
        pooled = self.pooled_summary()
        if not self.per_presentation:
            return pooled
        res: dict[str, Any] = {"modality": {}, "record": {}}
        by_task = {}
        for t in self.tasks:
            table = self.presentations(t.name)
            if table is not None:
                by_task[t.name] = (t, self._per_record(t, table))
        scores = []
        for m, mod in enumerate(MODALITIES):
            tasks = {}
            for name, (t, per) in by_task.items():
                mine = {r: v for (mm, r), v in per.items() if mm == m}
                if not mine:
                    continue
                key = "acc" if t.kind == "classification" else "r2"
                vals = [v[key] for v in mine.values() if not math.isnan(v[key])]
                tasks[name] = {key: sum(vals) / len(vals) if vals else math.nan,
                               "n": float(sum(v["n"] for v in mine.values())), "records": len(mine)}
            if not tasks:
                continue
            entry = {"score": _primary(tasks), "n": float(sum(v["n"] for v in tasks.values())), "tasks": tasks}
            scores.append(entry["score"])
            res["modality"][mod] = entry
        for r in range(self.n_records):
            for m, mod in enumerate(MODALITIES):
                tasks = {name: {**per[(m, r)], "n": float(per[(m, r)]["n"])} for name, (t, per) in by_task.items()
                         if (m, r) in per}
                if tasks:
                    sid, region = self.record_ids[r] if r < len(self.record_ids) else (str(r), None)
                    res["record"][self.record_name(r)] = {"session": sid, "region": region, "modality": mod,
                                                          "tasks": tasks}
        res["score"] = sum(scores) / len(scores) if scores else math.nan
        res["pooled"] = pooled
        return res

    def scalars(self, prefix: str, sessions: bool = False) -> dict[str, float]:
        """Flat ``{prefix}/acc/{modality}/{task}``-style scalars for TensorBoard and Ray: the headline under
        ``acc``/``r2``/``score``, the per-query figures under ``acc_pooled``/``r2_pooled``/``score_pooled``
        (evaluation tallies only), losses always per query. ``sessions``: also
        ``{prefix}_record/{session_id/region}/{acc|r2}/{task}`` (evaluation tallies) or
        ``{prefix}_session/{session_id}/...`` (training tallies, pooled)."""
        s = self.summary()
        pooled = s.get("pooled")
        out = {f"{prefix}/score": s["score"]}
        for mod, e in s["modality"].items():
            out[f"{prefix}/score/{mod}"] = e["score"]
            for task, v in e["tasks"].items():
                for key in ("acc", "r2"):
                    if key in v:
                        out[f"{prefix}/{key}/{mod}/{task}"] = v[key]
        for mod, e in (pooled or s)["modality"].items():
            out[f"{prefix}/loss/{mod}"] = e["loss"]
            if pooled:
                out[f"{prefix}/score_pooled/{mod}"] = e["score"]
            for task, v in e["tasks"].items():
                out[f"{prefix}/loss/{mod}/{task}"] = v["loss"]
                for key in ("acc", "r2"):
                    if key in v and pooled:
                        out[f"{prefix}/{key}_pooled/{mod}/{task}"] = v[key]
        if pooled:
            out[f"{prefix}/score_pooled"] = pooled["score"]
        if sessions:
            section = "record" if "record" in s else "session"
            for name, e in s[section].items():
                for task, v in e["tasks"].items():
                    for key in ("acc", "r2"):
                        if key in v:
                            out[f"{prefix}_{section}/{name}/{key}/{task}"] = v[key]
        return out

    def confusion_matrices(self) -> dict[str, dict[str, Any]]:
        """{task: {modality: (C, C) numpy counts, rows = true class}} for modalities with queries: one count
        per presentation (its averaged prediction) with ``per_presentation``, else one per query."""
        res = {}
        for task, mats in self.confusion.items():
            if self.per_presentation:
                mats = torch.zeros_like(mats)
                table = self.presentations(task)
                if table is not None:
                    pred = (table.logits / table.weight[:, None]).argmax(-1)
                    label = (table.target[:, 0] / table.weight).round().long()
                    c = mats.shape[-1]
                    flat = (table.keys[:, KEY_MODALITY] * c + label) * c + pred
                    mats.view(-1).index_add_(0, flat.to(mats.device), torch.ones_like(flat, dtype=mats.dtype,
                                                                                     device=mats.device))
            per = {mod: mats[m].cpu().numpy() for m, mod in enumerate(MODALITIES) if mats[m].sum() > 0}
            if per:
                res[task] = per
        return res


def _primary(tasks: dict[str, dict[str, float]]) -> float:
    """A modality's score: mean accuracy over its classification tasks (R² when it has none)."""
    primary = [v["acc"] for v in tasks.values() if "acc" in v] or [v["r2"] for v in tasks.values()]
    return sum(primary) / len(primary) if primary else math.nan
