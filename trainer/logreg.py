"""The per-session linear decoder the papers compare against: logistic regression on presentation-aligned
activity (``trainer.presentations``), one model per (record, task), fit on the train split and scored on the
test split.

EPhys counts are square-root transformed (variance-stabilised Poisson counts). The latency (EPhys) and then the
L2 strength are picked on the valid split. Units absent from a chunk (e.g. a ROI with NaN frames there) read as
the train mean. The fit is full-batch L-BFGS on the multinomial log-likelihood (torch; scikit-learn is not a
dependency), standardised features, a bias per class.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trainer.presentations import per_record, pick_and_score

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


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
    def fit(x: np.ndarray, y: np.ndarray, k: int, l2: float) -> tuple[torch.Tensor, ...]:
        return fit_logreg(np.sqrt(x) if modality == "ephys" else x, y, k, l2)

    def pred(model: tuple[torch.Tensor, ...], x: np.ndarray) -> np.ndarray:
        return predict(model, np.sqrt(x) if modality == "ephys" else x)

    r = pick_and_score(samples, columns, task, n_classes, modality, fit, pred, L2_GRID)
    return {"acc": r["acc"], "n": r["n"], "latency": r["latency"], "l2": r["param"]}


def logreg_baseline(store_uri: str, sessions: list[str], n_classes: dict[str, int]) -> dict:
    """{modality: {task: mean over records of test accuracy}} plus per-record rows under "record"
    ("session/region" keys) for the records of ``sessions``."""
    return per_record(store_uri, sessions, n_classes, {"logreg": logreg_record})["logreg"]
