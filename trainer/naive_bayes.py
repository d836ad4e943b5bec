"""The plug-in naive Bayes decoder: the ideal observer's own form, with its parameters estimated from the
record's train split instead of known. It measures how much of the ideal observer one session's data allow
a decoder that is told the generative family (and nothing else) to reach; the gap between it and the ideal
is what only knowledge from other sessions (pretraining) can close.

On the same presentation-aligned features as the logistic regression (``trainer.presentations``):
- EPhys: independent Poisson counts per unit and class. The class rate is shrunk towards the unit's mean
  count over all train presentations, ``(sum of counts + a * mean) / (presentations + a)`` (a gamma prior of
  ``a`` pseudo-presentations), plus a floor of 1e-3 counts so a unit silent in training costs no infinity.
- OPhys: independent Gaussians per ROI and class with one variance per ROI (diagonal linear discriminant),
  class means shrunk the same way; the variance is the pooled within-class variance plus 1e-6.
The shrinkage ``a`` and the EPhys latency are picked on the valid split. A unit absent from a presentation's
chunk (NaN) contributes nothing to its log-likelihood; a flat prior over classes, as the ideal observer's.

Closed form, numpy only: the whole benchmark's records fit in seconds. The logistic regression on the same
counts (``trainer.logreg``) must learn that counts are Poisson; at 11 train presentations per natural scene
this one knows it, and on the benchmark's held-out EPhys session it is the stronger decoder (docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.presentations import per_record, pick_and_score

SHRINK_GRID = (0.25, 1.0, 4.0, 16.0)
RATE_FLOOR = 1e-3  # counts: a unit silent in every train presentation of a class
VAR_FLOOR = 1e-6  # dF/F squared


@dataclass
class NaiveBayes:
    """Per-class parameters (n_classes, n_units): Poisson rates, or Gaussian means with ``var`` (n_units,)."""

    kind: str  # "poisson" | "gauss"
    mean: np.ndarray
    var: np.ndarray | None = None


def _class_sums(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x with NaN as 0, presence mask, per-class sums (K, U), per-class presence counts (K, U))."""
    mask = ~np.isnan(x)
    xz = np.where(mask, x, 0.0)
    onehot = np.eye(n_classes)[y]  # (P, K)
    return xz, mask, onehot.T @ xz, onehot.T @ mask


def fit_naive_bayes(x: np.ndarray, y: np.ndarray, n_classes: int, shrink: float, kind: str) -> NaiveBayes:
    """Class means shrunk towards each unit's overall mean by ``shrink`` pseudo-presentations."""
    xz, mask, sums, counts = _class_sums(x, y, n_classes)
    overall = xz.sum(0) / np.maximum(mask.sum(0), 1)
    mean = (sums + shrink * overall) / (counts + shrink)
    if kind == "poisson":
        return NaiveBayes("poisson", mean + RATE_FLOOR)
    resid = np.where(mask, xz - mean[y], 0.0)
    var = (resid ** 2).sum(0) / np.maximum(mask.sum(0), 1) + VAR_FLOOR
    return NaiveBayes("gauss", mean, var)


def log_likelihood(model: NaiveBayes, x: np.ndarray) -> np.ndarray:
    """(P, K) log-likelihood of every presentation under every class, up to a per-presentation constant."""
    mask = ~np.isnan(x)
    xz, m = np.where(mask, x, 0.0), mask.astype(np.float64)
    if model.kind == "poisson":
        return xz @ np.log(model.mean).T - m @ model.mean.T
    inv = 1.0 / model.var
    return (xz * inv) @ model.mean.T - 0.5 * (m * inv) @ (model.mean ** 2).T


def predict_naive_bayes(model: NaiveBayes, x: np.ndarray) -> np.ndarray:
    return log_likelihood(model, x).argmax(1)


def naive_bayes_record(samples: dict[str, list], columns: dict[str, int], task: str, n_classes: int,
                       modality: str) -> dict:
    """Test accuracy of the valid-picked (latency, shrinkage) decoder, refit on train: {acc, n, latency, shrink}."""
    kind = "poisson" if modality == "ephys" else "gauss"

    def fit(x: np.ndarray, y: np.ndarray, k: int, shrink: float) -> NaiveBayes:
        return fit_naive_bayes(x, y, k, shrink, kind)

    r = pick_and_score(samples, columns, task, n_classes, modality, fit, predict_naive_bayes, SHRINK_GRID)
    return {"acc": r["acc"], "n": r["n"], "latency": r["latency"], "shrink": r["param"]}


def naive_bayes_baseline(store_uri: str, sessions: list[str], n_classes: dict[str, int]) -> dict:
    """{modality: {task: mean over records of test accuracy}} plus per-record rows under "record"."""
    return per_record(store_uri, sessions, n_classes, {"naive_bayes": naive_bayes_record})["naive_bayes"]
