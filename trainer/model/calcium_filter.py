"""The likelihood readout's OPhys term as a matched filter with decision feedback
(``ModelConfig.likelihood_ophys_form = "filter"``).

Why: the readout's first OPhys form (``"sum"``, :mod:`trainer.model.likelihood`) scores a presentation by each ROI's
summed calcium innovations over its span. The sum's noise is dominated by the two tokens at the span's edges (an
innovation is ``d_k = A n_k + e_k - a e_(k-1)``: the noise of the tokens inside cancels but for ``1 - a``), and
the tokens around the span, which could denoise those edges, hold the neighbouring presentations' responses. With
every ROI's true rates that form reaches 0.89 / 0.89 / 0.87 of the ideal observer's lower bound on the benchmark's
held-out plane. The ideal's own decoder is a Gaussian matched filter over the presentation and its tail, re-run
with the neighbours' calcium at their posterior-mean rates (decision feedback). Its token-level equivalent here,
with the true rates, reaches 0.95 / 1.04 / 1.03 of that bound on the same plane and 1.00 / 0.97 / 1.00 on average
over four planes (``bench/readout_ceiling.py --filter``; docs/model.md section 22); without the feedback, 0.87 /
1.04 / 0.81 on that plane.

The model, per ROI ``u`` of a window, over its innovations ``d_k`` (token ``k`` minus the decay of token ``k-1``,
covering the interval ``(t_(k-1), t_k]``):

    d_k = o_u + sum_t A_u[t] n_(k-t) + eta_k,     n_j ~ Poisson(lambda_j),   t in TAPS

``lambda_j`` the expected spikes in interval ``j``: the ROI's baseline rate times its length, plus, for every
queried presentation overlapping it, the overlap times (the presentation's rate minus the baseline). The taps
carry the calcium rise (a spike late in one interval shows in the next innovation) and the span's alignment;
``eta`` is the token noise's MA(1) (variance ``s_u^2``, lag-1 covariance ``rho_u s_u^2``, ``|rho| < 0.49``).
Around the mean at the current rates, the innovations are Gaussian with covariance ``Sigma`` (that noise plus
each interval's Poisson variance through the taps), and a query's log-likelihood of class ``c`` is, per ROI,

    dr_c h' Sigma^-1 (d - mu) - dr_c^2 / 2 h' Sigma^-1 h,      dr_c = rate[c] - mean_c rate[c]

with ``h`` the filter of the query's span through the taps (the query's own presentation at its prior mean
in ``mu``). Pass 0 puts every presentation at its prior mean; each feedback pass puts the neighbours at their
posterior-mean rates from the pass before (its posterior detached). The generative fit (``likelihood_fit``) is the
exact Gaussian negative log-likelihood of each ROI's innovations with every labelled presentation at its true
class. Windows are short (1 s: ~10 tokens per ROI), so ``Sigma`` is a dense (K, K) per (sample, ROI).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: innovation k reads the spikes of interval k - t for each tap t: -1 aligns a span that starts late, 1 and 2
#: carry the calcium rise into the next innovations
TAPS = (-1, 0, 1, 2)


@dataclass
class Grid:
    """A batch's OPhys tokens of the kept samples as (sample, ROI) groups x positions, padded."""

    sample: Tensor  # (G,) each group's sample
    unit: Tensor  # (G,) its ROI (global unit index)
    x: Tensor  # (G, K) token values, in time order
    t: Tensor  # (G, K) token times (window time)
    valid: Tensor  # (G, K) bool: a token there
    first: Tensor  # (S + 1,) groups of sample s: first[s] .. first[s + 1] - 1 (groups sorted by sample)


def token_grid(unit: Tensor, time: Tensor, sample: Tensor, values: Tensor, n_samples: int) -> Grid:
    """Group the tokens by (sample, unit) and lay each group out in time order; any token order in."""
    n_u = int(unit.max()) + 1
    key = sample * n_u + unit
    by_time = torch.sort(time, stable=True).indices
    order = by_time[torch.sort(key[by_time], stable=True).indices]
    keys, counts = torch.unique_consecutive(key[order], return_counts=True)
    g = torch.repeat_interleave(torch.arange(len(keys), device=unit.device), counts)
    pos = torch.arange(len(order), device=unit.device) - F.pad(counts.cumsum(0), (1, 0))[g]
    k = int(counts.max())
    x = values.new_zeros(len(keys), k)
    t = time.new_zeros(len(keys), k)
    valid = torch.zeros(len(keys), k, dtype=torch.bool, device=unit.device)
    x[g, pos], t[g, pos], valid[g, pos] = values[order], time[order], True
    gs = keys // n_u
    first = F.pad(torch.bincount(gs, minlength=n_samples).cumsum(0), (1, 0))
    return Grid(gs, keys % n_u, x, t, valid, first)


def innovations(grid: Grid, tau: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d, valid, t_lo, t_hi), each (G, K): each token minus the decay of the one before it (``tau`` (G,) s), and
    the interval it covers; position 0 has no predecessor and is invalid."""
    x, t = grid.x, grid.t
    dt = (t[:, 1:] - t[:, :-1]).clamp(min=0.0)
    d = F.pad(x[:, 1:] - torch.exp(-dt / tau[:, None]) * x[:, :-1], (1, 0))
    valid = F.pad(grid.valid[:, 1:] & grid.valid[:, :-1], (1, 0))
    t_lo = F.pad(t[:, :-1], (1, 0))
    return torch.where(valid, d, torch.zeros_like(d)), valid, t_lo, t


def _shift(x: Tensor, t: int) -> Tensor:
    """``out[..., k] = x[..., k - t]`` (zeros where k - t is outside)."""
    if t == 0:
        return x
    if t > 0:
        return F.pad(x[..., :-t], (t, 0))
    return F.pad(x[..., -t:], (0, -t))


def _through_taps(x: Tensor, amp: Tensor) -> Tensor:
    """(N, K) per-interval quantities through each row's taps ``amp`` (N, len(TAPS))."""
    return sum(amp[:, i, None] * _shift(x, t) for i, t in enumerate(TAPS))  # type: ignore[return-value]


@dataclass
class FilterInputs:
    """Everything the filter needs per group and per (query, group) pair."""

    d: Tensor  # (G, K) innovations
    valid: Tensor  # (G, K)
    length: Tensor  # (G, K) each interval's length (0 where invalid)
    amp: Tensor  # (G, len(TAPS)) taps
    offset: Tensor  # (G,)
    noise_var: Tensor  # (G,) s^2
    rho: Tensor  # (G,) lag-1 correlation of the noise, |rho| < 0.49
    base: Tensor  # (G,) baseline rate (Hz)
    pair_group: Tensor  # (P,) each pair's group
    overlap: Tensor  # (P, K) seconds of the query's span in each interval


def covariance(inp: FilterInputs, lam: Tensor) -> Tensor:
    """(G, K, K) the innovations' covariance given expected interval counts ``lam`` (G, K); identity rows at the
    invalid positions."""
    var = inp.noise_var[:, None] + _through_taps(lam, inp.amp ** 2)
    var = torch.where(inp.valid, var, torch.ones_like(var))
    both = inp.valid[:, 1:] & inp.valid[:, :-1]
    off = torch.where(both, (inp.rho * inp.noise_var)[:, None].expand_as(both), torch.zeros_like(var[:, 1:]))
    return torch.diag_embed(var) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)


def expected_counts(inp: FilterInputs, excess: Tensor) -> Tensor:
    """(G, K) expected spikes per interval: the baseline, plus each pair's overlap times ``excess`` (P,), its
    presentation's rate minus the baseline."""
    lam = inp.base[:, None] * inp.length
    return lam.index_add(0, inp.pair_group, inp.overlap * excess[:, None])


def filter_terms(inp: FilterInputs, lam: Tensor, own_excess: Tensor) -> tuple[Tensor, Tensor]:
    """(z, q) per pair: ``h' Sigma^-1 (d - mu)`` with the pair's own presentation put back at its prior mean
    (``own_excess`` (P,): its rate in ``lam`` minus that mean), and ``h' Sigma^-1 h``."""
    mu = inp.offset[:, None] + _through_taps(lam, inp.amp)
    resid = torch.where(inp.valid, inp.d - mu, torch.zeros_like(mu))
    chol = torch.linalg.cholesky(covariance(inp, lam))
    g = inp.pair_group
    h = _through_taps(inp.overlap, inp.amp[g]) * inp.valid[g]
    w = torch.cholesky_solve(h[:, :, None], chol[g]).squeeze(-1)  # Sigma^-1 h
    q = (w * h).sum(-1)
    z = (w * resid[g]).sum(-1) + q * own_excess
    return z, q


def gaussian_nll(inp: FilterInputs, lam: Tensor) -> Tensor:
    """(G,) the exact negative log-likelihood (up to a constant) of each group's innovations at counts ``lam``."""
    mu = inp.offset[:, None] + _through_taps(lam, inp.amp)
    resid = torch.where(inp.valid, inp.d - mu, torch.zeros_like(mu))
    chol = torch.linalg.cholesky(covariance(inp, lam))
    white = torch.linalg.solve_triangular(chol, resid[:, :, None], upper=False).squeeze(-1)
    logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # the invalid rows add log 1 = 0
    return 0.5 * (white ** 2).sum(-1) + logdet
