"""New units' embedding rows predicted from their responses (``--unit-init tuning``), instead of noise.

Finetuning on a new session starts its units' rows at N(0, 0.02): the pretrained trunk reads nothing from
them until gradient descent on that one session has written each unit's tuning into its row, which is what
bounds the finetuned decoder (docs/model.md section 9: a trunk trained twice as long left the held-out scores
where they were). The pretraining already holds, for every unit it trained, both that unit's responses and
the row the trunk learned to read for it. So the map from one to the other is fitted on the pretraining's
units and applied to the new ones:

- a unit's *response features*, from the train chunks of its record the run trains on (the data finetuning
  may use; with ``--train-fraction`` only that share of them):
  for every task, its mean response per class (EPhys: square-root spike counts in the presentation, at a
  50 ms latency; OPhys: mean dF/F, ``trainer.presentations``), centred on and divided by the unit's
  overall mean and spread, followed by that mean and spread;
- a ridge regression per modality from those features to the pretrained rows (plus an intercept), its
  strength picked by leave-one-session-out on the pretraining units (``RIDGE_GRID``), so nothing of the
  new sessions is used to choose it;
- the new rows = the regression's prediction. New session rows = the mean of the trained rows of the
  same modality (a new session's row is otherwise the one input of the decoder that is pure noise).

Closed form in numpy: on the benchmark corpus (16 records, 1,520 units) the features take ~3 s to read.

A *fresh* model (pretraining, or a model trained from scratch) has no trained rows to map onto; there
``--unit-init pca`` starts every trained unit's row at the principal components of all units' standardised
class means (EPhys and OPhys together: both see the same stimuli, so a unit and a ROI tuned alike start alike),
scaled like the random rows, plus noise. Why: a pretraining spends its first ~1,300 steps near chance while
the trunk and 1,520 random rows find each other (docs/model.md section 11); rows that already order the units by
their tuning are a start the trunk can read from the first step.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from shards.stream.plan import PlanConfig, train_chunks
from trainer.presentations import EPHYS_LATENCY_S, TASKS, iter_records, record_features
from trainer.sessions import session_modalities

RIDGE_GRID = (1.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
PCA_COMPONENTS = 16  # leading components that seed a fresh row; the rest of the row is noise
PCA_NOISE = 0.1  # the noise's scale relative to the random init's
MIN_FIT_SESSIONS = 2  # leave-one-session-out needs two


class UnitInitError(ValueError):
    """The store cannot support ``unit_init=tuning`` (one line, naming the store and what is missing)."""


def too_few_sessions(store_uri: str, modality: str, found: int) -> UnitInitError:
    return UnitInitError(f"{store_uri}: unit_init=tuning needs the train split of at least {MIN_FIT_SESSIONS} "
                         f"pretraining sessions of {modality} in this store, found {found}")


def check_store(store_uri: str, trained: Iterable[str], new: Iterable[str]) -> None:
    """Before any training: the store must hold >= MIN_FIT_SESSIONS trained sessions of each new session's
    modality (UnitInitError naming the store otherwise)."""
    mod = session_modalities(store_uri)
    trained = set(trained)
    for m in sorted({mod[s] for s in new if s in mod}):
        n = len({s for s in trained if mod.get(s) == m})
        if n < MIN_FIT_SESSIONS:
            raise too_few_sessions(store_uri, m, n)


def response_features(store_uri: str, sessions: Iterable[str], n_classes: dict[str, int],
                      plan: PlanConfig | None = None) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """({unit_id: feature vector}, {unit_id: session}, {unit_id: modality}) for every unit of those of
    ``sessions`` the store holds, from the train chunks a run with ``plan`` trains on (its window length,
    seed and ``train_fraction``: a finetuning on a quarter of a session's data initialises from that quarter)."""
    out: dict[str, np.ndarray] = {}
    session_of: dict[str, str] = {}
    modality_of: dict[str, str] = {}
    for rec in iter_records(store_uri, sessions, ("train",), lambda c: train_chunks(c, plan or PlanConfig())):
        parts = []
        for task in TASKS:
            x, y = record_features(rec.samples["train"], rec.columns, task,
                                   EPHYS_LATENCY_S if rec.modality == "ephys" else 0.0)
            parts.extend(_tuning(np.sqrt(x) if rec.modality == "ephys" else x, y, n_classes[task]))
        for uid, f in zip(rec.unit_ids, np.concatenate(parts, 1)):
            out[uid] = f
            session_of[uid], modality_of[uid] = rec.session, rec.modality
    return out, session_of, modality_of


def _tuning(x: np.ndarray, y: np.ndarray, k: int) -> list[np.ndarray]:
    """[(U, k) standardised class means, (U, 2) mean and spread] of (P, U) responses with NaN for absent."""
    mask = ~np.isnan(x)
    xz = np.where(mask, x, 0.0)
    n = np.maximum(mask.sum(0), 1)
    mu = xz.sum(0) / n
    sd = np.sqrt((np.where(mask, xz - mu, 0.0) ** 2).sum(0) / n) + 1e-6
    onehot = np.eye(k)[y] if len(y) else np.zeros((0, k))
    means = (onehot.T @ xz) / np.maximum(onehot.T @ mask, 1)  # (k, U); a class never shown: 0 -> -mu/sd
    present = (onehot.T @ mask) > 0
    z = np.where(present, (means - mu) / sd, 0.0)
    return [z.T, np.stack([mu, sd], 1)]


def fit_ridge(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(weights (F + 1, D) with the intercept last, the strength picked, its leave-one-group-out R^2)."""
    xa = np.c_[x, np.ones(len(x))]
    pen = np.eye(xa.shape[1])
    pen[-1, -1] = 0.0  # the intercept is not shrunk
    best = (-np.inf, RIDGE_GRID[0])
    for lam in RIDGE_GRID:
        resid = total = 0.0
        for g in np.unique(groups):
            tr, te = groups != g, groups == g
            w = np.linalg.solve(xa[tr].T @ xa[tr] + lam * pen, xa[tr].T @ y[tr])
            resid += float(((y[te] - xa[te] @ w) ** 2).sum())
            total += float(((y[te] - y[te].mean(0)) ** 2).sum())
        r2 = 1.0 - resid / max(total, 1e-12)
        if r2 > best[0]:
            best = (r2, lam)
    r2, lam = best
    return np.linalg.solve(xa.T @ xa + lam * pen, xa.T @ y), lam, r2


def predict_rows(features: dict[str, np.ndarray], known: dict[str, np.ndarray], new: list[str],
                 session_of: dict[str, str], modality_of: dict[str, str], store_uri: str) -> tuple[dict, dict]:
    """({new unit id: predicted row}, {modality: {"ridge": strength, "r2": leave-one-session-out R^2}}).

    ``known``: trained unit id -> its pretrained row; ``session_of`` / ``modality_of``: every unit's session
    and modality. Fits one map per modality of the new units."""
    rows: dict[str, np.ndarray] = {}
    fits: dict[str, dict] = {}
    for mod in sorted({modality_of[u] for u in new}):
        train = [u for u in known if modality_of.get(u) == mod and u in features]
        groups = np.array([session_of[u] for u in train])
        if len(set(groups)) < MIN_FIT_SESSIONS:
            raise too_few_sessions(store_uri, mod, len(set(groups)))
        w, lam, r2 = fit_ridge(np.stack([features[u] for u in train]), np.stack([known[u] for u in train]), groups)
        mine = [u for u in new if modality_of[u] == mod]
        pred = np.c_[np.stack([features[u] for u in mine]), np.ones(len(mine))] @ w
        rows.update(zip(mine, pred))
        fits[mod] = {"ridge": lam, "r2": round(r2, 4), "fit_units": len(train), "new_units": len(mine)}
    return rows, fits


def class_mean_columns(n_classes: dict[str, int]) -> np.ndarray:
    """Which columns of a ``response_features`` vector are standardised class means (not a unit's mean and spread,
    whose scale differs between counts and dF/F)."""
    return np.concatenate([np.r_[np.ones(n_classes[t], bool), np.zeros(2, bool)] for t in TASKS])


def pca_rows(features: dict[str, np.ndarray], n_classes: dict[str, int], dim: int, scale: float,
             seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """({unit id: row}, {"components", "explained"}): every unit's standardised class means projected on the leading
    ``PCA_COMPONENTS`` principal components of all of them, scaled to ``scale`` per coordinate, in the first
    coordinates of a ``dim``-wide row whose rest is N(0, ``PCA_NOISE * scale``) noise."""
    ids = sorted(features)
    x = np.stack([features[u] for u in ids])[:, class_mean_columns(n_classes)]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    left, sv, _ = np.linalg.svd(x, full_matrices=False)
    k = min(PCA_COMPONENTS, dim, len(sv))
    scores = left[:, :k] * sv[:k]
    scores *= scale / max(float(scores.std()), 1e-12)
    rows = np.random.default_rng(seed).normal(0.0, PCA_NOISE * scale, (len(ids), dim))
    rows[:, :k] += scores
    explained = float((sv[:k] ** 2).sum() / max((sv ** 2).sum(), 1e-12))
    return dict(zip(ids, rows)), {"components": k, "explained": round(explained, 4), "units": len(ids)}

