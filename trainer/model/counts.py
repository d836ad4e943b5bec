"""An auxiliary generative loss on the units' rows: each unit's spike count around a labelled query, from its row
and the query's class (``ModelConfig.count_loss``, off by default).

Why: the decoder's loss is one label per presentation, so a unit's row learns from the few presentations of each
class only through the gradient of a 119-way softmax: a discriminative, low-rank multinomial regression. On the
benchmark corpus a per-session naive Bayes (the generative form, a rate per unit and class) beats both the logistic
regression and the model on natural scenes, where each class has ~11 presentations per session: the regime where a
generative fit converges faster than a discriminative one (Ng & Jordan 2001). This loss gives every unit of an
EPhys window a target per labelled query, its count in the presentation's latency-shifted span, predicted as

    count ~ Poisson(span * softplus(a_u + v_u . code[task][class])),   (a_u, v_u) = A(row_u),

with ``A`` one shared linear map (D -> rank + 1) and ``code`` a learned vector per (task, class): the form of the
synthetic generator and of a Poisson GLM on real data. The rows the encoder reads are the ones this fits, so a
unit's row learns its tuning from all of its spikes, as the new-session observer fits its 10 numbers
(docs/model.md section 11). The counts come from the batch's own tokens (nothing new in the stream).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shards.schema import MODALITY_INDEX
from trainer.model.packing import segment_ids


def query_unit_counts(unit: Tensor, time: Tensor, cu_in: Tensor, q_sample: Tensor, lo: Tensor,
                      hi: Tensor, values: Tensor | None = None, members: tuple[Tensor, Tensor] | None = None,
                      sample_of_token: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """For every query q (its sample ``q_sample``, its span [lo, hi) in window time) and every unit that has a
    token in q's sample, or is listed for it in ``members`` (units, cu: each sample's units, silent ones too):
    (query of the row, unit of the row, tokens of that unit in the span, the sum of those tokens' ``values``
    ((N,) or (N, k), summed per column) or None when no values are given). ``sample_of_token``: each token's
    sample, ``segment_ids(cu_in)``, where the caller has it already.

    Vectorised over the packed batch (no Python loop over samples): a query's rows are its sample's (sample,
    unit) pairs, and a token counts towards the row of its own pair when its time is in the query's span."""
    device = unit.device
    n_samples = cu_in.numel() - 1
    if sample_of_token is None:
        sample_of_token = segment_ids(cu_in, unit.numel())
    n_u = int(unit.max()) + 1 if unit.numel() else 1
    if members is None:
        pairs, pair_of_token = torch.unique(sample_of_token * n_u + unit, return_inverse=True)  # sorted: by sample
    else:
        m_unit, cu_m = members
        n_u = max(n_u, int(m_unit.max()) + 1 if m_unit.numel() else 1)
        token_key = sample_of_token * n_u + unit
        listed = segment_ids(cu_m.long(), m_unit.numel()) * n_u + m_unit
        pairs = torch.unique(torch.cat([token_key, listed]))  # sorted: by sample
        pair_of_token = torch.searchsorted(pairs, token_key)
    pair_sample = pairs // n_u
    per_sample = torch.bincount(pair_sample, minlength=n_samples)
    first_pair = F.pad(per_sample.cumsum(0), (1, 0))[q_sample]  # each query's first row of its sample's pairs
    # rows: every (query, pair of its sample)
    reps = per_sample[q_sample]
    row_start = F.pad(reps.cumsum(0), (1, 0))
    n_rows = int(row_start[-1])
    row_q = torch.repeat_interleave(torch.arange(len(q_sample), device=device), reps, output_size=n_rows)
    row_pair = first_pair[row_q] + torch.arange(n_rows, device=device) - row_start[row_q]
    # (query, token of its sample): count the tokens in the query's span into their pair's row
    tokens = torch.diff(cu_in)[q_sample]
    tok_start = F.pad(tokens.cumsum(0), (1, 0))
    n_pairs = int(tok_start[-1])
    tq = torch.repeat_interleave(torch.arange(len(q_sample), device=device), tokens, output_size=n_pairs)
    tt = cu_in[q_sample][tq] + torch.arange(n_pairs, device=device) - tok_start[tq]
    t = time[tt]
    inside = (t >= lo[tq]) & (t < hi[tq])
    rows = row_start[tq] + pair_of_token[tt] - first_pair[tq]
    counts = torch.zeros(n_rows, device=device).index_add_(0, rows[inside], torch.ones_like(t[inside]))
    sums = None if values is None else \
        values.new_zeros((n_rows, *values.shape[1:])).index_add_(0, rows[inside], values[tt][inside])
    return row_q, pairs[row_pair] % n_u, counts, sums


class CountHead(nn.Module):
    """Rates of (unit row, task, class) pairs: ``softplus(a_u + v_u . code[task][class])`` in Hz. ``tasks``: the
    model's tasks in order, each (name, classes), classes None where it is not a classification (no class to code)."""

    def __init__(self, *, dim: int, rank: int, tasks: list[tuple[str, int | None]], norm: bool = False) -> None:
        super().__init__()
        self.rank = rank
        self.tasks = [name if n is not None else None for name, n in tasks]  # by the model's task index
        # norm: the head reads each row's direction (LayerNorm, no weights), so fitting rates does not have to grow
        # the rows the encoder reads (rows start at 0.02 scale; rates need a_u of several units)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False) if norm else nn.Identity()
        self.unit_map = nn.Linear(dim, rank + 1)
        self.codes = nn.ParameterDict({name: nn.Parameter(torch.randn(n, rank) * rank ** -0.5)
                                       for name, n in tasks if n is not None})

    def rate(self, rows: Tensor, task_of_row: Tensor, label: Tensor) -> Tensor:
        """rows (R, D), each row's task (the model's task index) and class -> rates (R,)."""
        h = self.unit_map(self.norm(rows))
        code = torch.zeros(len(rows), self.rank, device=rows.device, dtype=h.dtype)
        for k, name in enumerate(self.tasks):
            if name is None:
                continue
            m = task_of_row == k
            if m.any():
                code[m] = self.codes[name][label[m]].to(h.dtype)
        return F.softplus(h[:, 0] + (h[:, 1:] * code).sum(-1))


def count_nll(head: CountHead, unit_rows, batch: dict[str, Tensor], q_sample: Tensor, *, latency: float,
              span: float, window_s: float) -> Tensor:
    """Mean Poisson negative log-likelihood (up to a constant) of the units' counts around the labelled queries of
    the batch's EPhys samples; a span that leaves the window is not scored (its spikes are not in the batch).
    ``unit_rows(index)`` gives the D-wide rows of global unit indices; ``q_sample`` is each query's sample (the
    model's loss has it already)."""
    label = batch["output_labels"]
    lo = batch["output_timestamps"].float() - span / 2 + latency
    hi = lo + span
    scored = torch.tensor([name is not None for name in head.tasks], device=label.device)
    keep = (batch["modality"][q_sample] == MODALITY_INDEX["ephys"]) & (label >= 0) & (lo >= 0) & (hi <= window_s)
    keep &= scored[batch["output_task_index"]]
    if not bool(keep.any()):
        return batch["output_timestamps"].float().sum() * 0.0
    q = keep.nonzero().squeeze(1)
    row_q, row_unit, counts, _ = query_unit_counts(batch["input_unit_index"], batch["input_timestamps"].float(),
                                                batch["input_cu_seqlens"].long(), q_sample[q], lo[q], hi[q])
    if counts.numel() == 0:
        return batch["output_timestamps"].float().sum() * 0.0
    present, unit_index = torch.unique(row_unit, return_inverse=True)
    rows = unit_rows(present)[unit_index]
    mu = head.rate(rows, batch["output_task_index"][q][row_q], label[q][row_q]) * span
    return (mu - counts * torch.log(mu + 1e-6)).mean()
