"""The likelihood readout (``ModelConfig.likelihood_readout``): each classification query's logits gain the
log-likelihood of its units' responses under every class, from an encoding model the units' rows parametrise.

Why: the decoder's path to a class runs through cross-attention into latents, a trunk, and a query, and it learns a
new session's units only through the gradient of a softmax over classes; on the benchmark corpus that path ends
level with a per-session naive Bayes, far below a decoder that knows the corpus's shared code (docs/model.md
sections 11-17). Neuroscience's own decoder is the inverse of an encoding model: a rate per unit and class,
and the class whose rates best explain the counts (a Poisson GLM). Here that model is *shared*: one learned code per
(task, class), the same for both modalities (they see the same stimuli), and each unit's tuning read from its row,

    rate[u, c] = softplus(b_u) + softplus(g_u[task]) * softplus(v_u . code[task][c])      (b, g, v) = A_m(LN(row_u))

with ``A_m`` one linear map per modality. A new session's units only need rows that this map reads right, so a
pretrained code carries over as the shared part of the corpus does. The query's logits then gain

    EPhys:  sum_u  n_u log rate[u, c] - T rate[u, c]                  (Poisson counts n_u in the span of length T)
    OPhys:  sum_u -k_u (x_u - rate[u, c])^2 / (2 s_u^2)              (mean dF/F x_u of the k_u tokens in the span)

(class-independent terms dropped), over every unit of the query's window (``sample_unit_index``: those unit
dropout kept, silent ones included: a unit that does not fire is evidence against the classes that drive it, and
leaving it out biases a 1-s drifting grating's counts upwards). The same encoding model
is also fit to the responses it explains (``likelihood_fit``): the negative log-likelihood of each unit's response
under the query's true class, the generative fit the new-session observer makes (docs/model.md section 11). The
cross-entropy alone reaches a class's code only through that class's share of the posterior, and a code that
starts uninformative can stay so (measured: drifting gratings decoded below chance by the readout alone). The span is the part of
the presentation inside the window (``output_span``), shifted by the modality's response latency and clipped to the
window. The sum is added to the decoder's logits (a product of experts, trained end to end by the same
cross-entropy), so the model can lean on either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shards.schema import MODALITY_INDEX
from trainer.model.counts import query_unit_counts

#: spans shorter than this (seconds) after clipping to the window get no likelihood term
MIN_SPAN_S = 0.05


class LikelihoodHead(nn.Module):
    """Per-modality maps from a unit's row to its encoding parameters, and the shared class codes.
    ``tasks``: the model's tasks in order as (name, classes or None for a regression)."""

    def __init__(self, *, dim: int, rank: int, tasks: list[tuple[str, int | None]]) -> None:
        super().__init__()
        self.rank = rank
        self.tasks = [name if n is not None else None for name, n in tasks]
        self.n_tasks = len(tasks)
        # the map reads each row's direction: rows start at 0.02 scale and the encoder reads them too
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        width = 2 + self.n_tasks + rank  # b, s, g per task, v
        self.unit_map = nn.ModuleList(nn.Linear(dim, width) for _ in MODALITY_INDEX)
        with torch.no_grad():
            for m, i in MODALITY_INDEX.items():
                lin = self.unit_map[i]
                lin.weight.mul_(0.5)
                lin.bias.zero_()
                # EPhys: a ~3 Hz baseline; OPhys: dF/F near 0, noise sd ~0.1; task gains ~0.02, so every class
                # starts alike (the readout adds ~nothing to the decoder until it has learnt something)
                lin.bias[0] = 3.0 if m == "ephys" else 0.0
                lin.bias[1] = -2.2
                lin.bias[2:2 + self.n_tasks] = -4.0
        self.codes = nn.ParameterDict({name: nn.Parameter(torch.randn(n, rank) * rank ** -0.5)
                                       for name, n in tasks if n is not None})
        # a learned log-temperature per (modality, task): a misspecified encoding model is over-confident in
        # proportion to the evidence (hundreds of units over a 1-s drifting grating), and the cross-entropy can
        # only calibrate it through this
        self.log_scale = nn.Parameter(torch.zeros(len(MODALITY_INDEX), self.n_tasks))

    def params(self, rows: Tensor, modality: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """rows (R, D) of one modality -> b (R,), noise sd s (R,), task gains g (R, n_tasks), v (R, rank)."""
        h = self.unit_map[modality](self.norm(rows))
        return h[:, 0], F.softplus(h[:, 1]) + 1e-3, F.softplus(h[:, 2:2 + self.n_tasks]), h[:, 2 + self.n_tasks:]

    def rates(self, b: Tensor, g: Tensor, v: Tensor, task: int, ephys: bool) -> Tensor:
        """(R, classes) mean response of each row's unit to each class of ``task``: Hz (EPhys) or dF/F (OPhys)."""
        drive = F.softplus(v @ self.codes[self.tasks[task]].T)  # type: ignore[index]
        base = F.softplus(b) if ephys else b
        return base[:, None] + g[:, task, None] * drive


def likelihood_logits(head: LikelihoodHead, unit_rows, batch: dict[str, Tensor], q_sample: Tensor, *,
                      latency: tuple[float, float], window_s: float, ophys: bool = True
                      ) -> tuple[dict[int, tuple[Tensor, Tensor]], Tensor | None]:
    """Per task index: (query rows, their (Q_k, classes) log-likelihoods) for the batch's classification queries
    whose span has at least ``MIN_SPAN_S`` inside the window; and the mean negative log-likelihood per (query,
    unit) of the labelled ones under their own class (None without any). ``latency``: (EPhys, OPhys) response
    latency in s; ``unit_rows(index)`` gives the D-wide rows of global unit indices; ``ophys`` False leaves OPhys
    queries to the decoder alone."""
    if "output_span" not in batch:
        raise ValueError("the likelihood readout needs the batch key 'output_span' (docs/batch.md); this batch has none")
    t = batch["output_timestamps"].float()
    half = batch["output_span"].float() / 2
    modality = batch["modality"][q_sample]
    lat = torch.where(modality == MODALITY_INDEX["ephys"], latency[0], latency[1]).to(t.dtype)
    lo = (t - half + lat).clamp(0.0, window_s)
    hi = (t + half + lat).clamp(0.0, window_s)
    task = batch["output_task_index"]
    scored = torch.tensor([name is not None for name in head.tasks], device=t.device)
    keep = scored[task] & (hi - lo >= MIN_SPAN_S)
    out: dict[int, tuple[Tensor, Tensor]] = {}
    if not bool(keep.any()):
        return out, None
    labels = batch["output_labels"]
    # every unit the window kept, silent ones included (batches without the list: the units with a token)
    members = ((batch["sample_unit_index"], batch["sample_unit_cu_seqlens"]) if "sample_unit_index" in batch
               else None)
    fit_sum, fit_n = t.new_zeros(()), 0
    parts: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for m_name, m in MODALITY_INDEX.items():
        if m_name == "ophys" and not ophys:
            continue
        q = (keep & (modality == m)).nonzero().squeeze(1)
        if q.numel() == 0:
            continue
        ephys = m_name == "ephys"
        x_in = None if ephys else batch["input_values"].float()  # EPhys needs counts only (its values are 0)
        row_q, row_unit, n_tok, v_sum = query_unit_counts(
            batch["input_unit_index"], batch["input_timestamps"].float(), batch["input_cu_seqlens"].long(),
            q_sample[q], lo[q], hi[q], values=None if x_in is None else torch.stack([x_in, x_in * x_in], 1),
            members=members)
        if v_sum is not None:  # OPhys: a ROI with no token in the span says nothing about it
            has = n_tok > 0
            row_q, row_unit, n_tok, v_sum = row_q[has], row_unit[has], n_tok[has], v_sum[has]
        if row_q.numel() == 0:
            continue
        present, unit_index = torch.unique(row_unit, return_inverse=True)
        b, s, g, v = head.params(unit_rows(present), m)
        b, s, g, v = b[unit_index], s[unit_index], g[unit_index], v[unit_index]
        qt = task[q][row_q]
        for k in qt.unique().tolist():
            r = (qt == k).nonzero().squeeze(1)
            rate = head.rates(b[r], g[r], v[r], k, ephys)
            y = labels[q][row_q[r]]
            mine = y >= 0
            own = rate[mine].gather(1, y[mine, None]).squeeze(1)
            if ephys:
                span = (hi - lo)[q][row_q[r]]
                ll = n_tok[r, None] * torch.log(rate + 1e-6) - span[:, None] * rate
                fit = span[mine] * own - n_tok[r][mine] * torch.log(own + 1e-6)
            else:
                assert v_sum is not None
                n, sums = n_tok[r], v_sum[r]
                x = sums[:, 0] / n
                ll = -n[:, None] * (x[:, None] - rate) ** 2 / (2 * s[r, None] ** 2)
                # sum over the span's tokens of (x_k - own)^2 / 2 s^2 + log s, from their sum and sum of squares
                sq = sums[mine, 1] - 2 * own * sums[mine, 0] + n[mine] * own ** 2
                fit = sq / (2 * s[r][mine] ** 2) + n[mine] * torch.log(s[r][mine])
            fit_sum = fit_sum + fit.sum()
            fit_n += int(mine.sum())
            ll = ll * head.log_scale[m, k].exp()
            local = row_q[r]
            queries, which = torch.unique(local, return_inverse=True)
            summed = ll.new_zeros(len(queries), ll.shape[1]).index_add_(0, which, ll)
            parts.setdefault(k, []).append((q[queries], summed))
    for k, items in parts.items():
        out[k] = (torch.cat([i for i, _ in items]), torch.cat([x for _, x in items]))
    return out, (fit_sum / fit_n if fit_n else None)
