"""A Gaussian prior on a finetuning's new unit rows, fit to the rows the pretraining trained (``unit_prior``).

Why: a new session's units get fresh rows of 64 numbers each, fit by gradient descent on that session's train
split alone; the likelihood readout reads ~21 encoding parameters from each (trainer.model.likelihood), where the
benchmark's new-session observer fits 10 per unit *under the corpus's priors* and reaches 0.97 of the ideal on
drifting gratings against the model's 0.77 (docs/model.md sections 11 and 19). The finetuning overfits (twice
the epochs lose, section 19), and its rows start as N(0, 0.02) noise, which is off the pretrained rows'
manifold: those vary ~100 times less in their weakest directions (eigenvalues 1.6e-5 against the noise's 4e-4
per dimension on the benchmark's seed 0), so a new row starts far from anything the trunk and the readout learnt to
read, along directions the data must then undo.

The prior is the empirical-Bayes answer: the pretrained rows of each modality are samples of what a unit's row
is, so a new unit's row gets their mean as its start and their Gaussian (mean, covariance shrunk towards its
average variance by ``SHRINK`` so no direction is infinitely stiff) as its prior, and the finetuning maximises
the posterior instead of the likelihood: ``loss += weight * mean over new units of 0.5 (r - mu)' P (r - mu)``.
Scale: the data term of a row is a mean over the (query, unit) pairs of a batch, so a MAP-consistent weight is
about (new units) / (presentations per unit x units per window), ~1e-3 on the benchmark. Measured, 0.3 does better
(1e-3 to 1 on two seeds, docs/model.md section 20): the cross-entropy also moves the rows, and the pretrained rows'
spread holds their own overfit, so the prior is wider than the truth's and needs the extra weight. With the readout's
fit weighted 60 times heavier (``likelihood_fit=60``) the benchmark finetunes at 3 (section 25).

With ``unit_prior_groups=region`` a new row whose (modality, region) has enough pretrained rows gets that region's
mean and the modality's spread within regions (measured level with the modality's prior on the benchmark, 3 seeds:
docs/model.md section 23; so not the default).

A modality whose pretrained rows are too few to estimate a covariance (< ``MIN_ROWS_PER_DIM`` per row dimension),
or whose sessions the store does not describe, uses the pooled fit of all pretrained rows. The prior is on the
encoder's table (``unit_emb``); with ``likelihood_own_rows`` the readout's own table is left free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SHRINK = 0.1  # covariance -> (1 - SHRINK) cov + SHRINK (trace / D) I
MIN_ROWS_PER_DIM = 2  # a modality needs this many pretrained rows per row dimension for its own fit
MIN_REGION_ROWS = 20  # a (modality, region) needs this many pretrained rows for its own mean (unit_prior_groups=region)


@dataclass
class RowPrior:
    """The prior of the new rows: ``rows`` (N,) model rows, each in ``group`` (N,) with ``mean`` (G, D) and
    ``precision`` (G, D, D)."""

    rows: Tensor
    group: Tensor
    mean: Tensor
    precision: Tensor
    weight: float

    def to(self, device: torch.device | str) -> RowPrior:
        """The same prior on ``device`` (the model's: the worker moves both once, before training)."""
        return dataclasses.replace(self, rows=self.rows.to(device), group=self.group.to(device),
                                   mean=self.mean.to(device), precision=self.precision.to(device))

    def penalty(self, table: Tensor) -> Tensor:
        """``weight`` x the mean over new rows of 0.5 x their Mahalanobis distance to their group's mean (on the
        prior's device: ``to``)."""
        d = table[self.rows].float() - self.mean[self.group]
        total = d.new_zeros(())
        for g in range(self.mean.shape[0]):
            dg = d[self.group == g]
            total = total + (dg @ self.precision[g] * dg).sum()
        return self.weight * 0.5 * total / max(1, len(self.rows))


def gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, precision) of rows ``x`` (n, D), the covariance shrunk towards its average variance."""
    mean = x.mean(0)
    cov = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
    cov = (1 - SHRINK) * cov + SHRINK * np.trace(cov) / x.shape[1] * np.eye(x.shape[1])
    return mean, np.linalg.inv(cov)


Group = tuple[str | None, str | None]  # (modality, region) of a row; region None when the prior groups by modality


def within_groups(x: np.ndarray, labels: list) -> np.ndarray:
    """The rows ``x`` (n, D) less their group's mean: their spread around it, pooled over the groups."""
    out = x.copy()
    for g in set(labels):
        idx = [i for i, k in enumerate(labels) if k == g]
        out[idx] -= x[idx].mean(0)
    return out


def fit_row_prior(table: Tensor, known: dict[int, Group], new: dict[int, Group], weight: float) -> RowPrior:
    """The prior of the ``new`` rows {model row: (modality, region)} from the ``known`` (pretrained) rows of
    ``table`` (rows, D), either name None where unknown or not grouped by.

    A modality with enough rows (``MIN_ROWS_PER_DIM`` per dimension) gets its own Gaussian, else the pooled one.
    A new row whose (modality, region) has at least ``MIN_REGION_ROWS`` pretrained rows gets that region's mean
    and the modality's covariance *within* regions (each trained row less its region's mean, pooled): the
    generator's regions, as the Allen areas, differ in their units' mean preference and in how sharply they are
    tuned to each task, which the new-session observer is told and a modality-wide prior blurs."""
    if not known:
        raise ValueError("unit_prior: the pretrained model has no trained unit rows to fit a prior to")
    w = table.detach().float().cpu().numpy()
    dim = w.shape[1]
    pooled = gaussian(w[sorted(known)])
    fits: dict[Group, tuple[np.ndarray, np.ndarray]] = {}
    whole: dict[str | None, tuple[np.ndarray, np.ndarray]] = {}  # each modality's own Gaussian, fit once
    within: dict[str | None, np.ndarray] = {}  # and its precision within regions, fit once
    for m, r in sorted(set(new.values()), key=str):
        mine = sorted(i for i, (k, _) in known.items() if k == m and m is not None)
        if len(mine) < MIN_ROWS_PER_DIM * dim:
            fits[(m, r)] = pooled
            continue
        region = [i for i in mine if r is not None and known[i][1] == r]
        if len(region) >= MIN_REGION_ROWS:
            if m not in within:
                within[m] = gaussian(within_groups(w[mine], [known[i][1] for i in mine]))[1]
            fits[(m, r)] = (w[region].mean(0), within[m])
        else:
            if m not in whole:
                whole[m] = gaussian(w[mine])
            fits[(m, r)] = whole[m]
    names = list(fits)
    rows = sorted(new)
    return RowPrior(rows=torch.as_tensor(rows, dtype=torch.int64),
                    group=torch.as_tensor([names.index(new[r]) for r in rows], dtype=torch.int64),
                    mean=torch.as_tensor(np.stack([fits[n][0] for n in names]), dtype=torch.float32),
                    precision=torch.as_tensor(np.stack([fits[n][1] for n in names]), dtype=torch.float32),
                    weight=weight)


@torch.no_grad()
def start_at_prior_mean(table: Tensor, prior: RowPrior) -> None:
    """New rows start at their group's mean: the average pretrained unit, not noise off the rows' manifold."""
    table[prior.rows] = prior.mean[prior.group].to(table.dtype)
