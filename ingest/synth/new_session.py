"""The new-session observer: the best a decoder can do on a held-out session if pretraining carried over
*everything the sessions share* and only the new units' own parameters had to be learned from its train split.

Why: the ideal observer (``ingest.synth.ideal``) knows every unit's true parameters, which no decoder of a new
session can. The plug-in naive Bayes (``trainer.naive_bayes``) knows nothing the sessions share and fits a rate
per unit and class (119 of them for natural scenes) from one session. Between the two sits what the papers'
transfer is about: a corpus's sessions share a stimulus code and each region's tuning
(``ingest.synth.generative``), so a new unit is only 10 numbers (its offset from the region's preference
``y`` (``code_dim``), log gain, log baseline). This observer is told the shared part (the code, each region's
projection, mean preference, task gains and latency, and the priors the generator draws units from) and fits
each unit's 10 numbers by maximum a posteriori on the record's train split; it then decodes the test split
exactly as the ideal observer does (same presentations, same windows, flat prior). Its accuracy is what a
model whose pretraining learned the shared code perfectly could reach from the held-out session's data, and
the gap between it and the model is what the model failed to carry over.

EPhys only: a unit's spike counts in a presentation's response window are Poisson with mean
``d * (b + g softplus(tg * (mu + y) . (P code_c)))`` (window length d, region projection P, task gain tg), so
the fit is a small Poisson regression per unit. It uses Fisher scoring (Newton's method with the expected
Hessian, ``sum_p J J^T / lambda`` plus the prior's precision; positive definite, so every step descends),
vectorised over the record's units, with step halving per unit; 10 parameters per unit converge in ~15
steps (0.5 s per record of 60 units and ~2,000 presentations on one core). OPhys would need the
fit through the calcium kernel and noise; not done.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np

from ingest.synth.generative import CorpusModel, SessionTruth, UnitParams, softplus
from ingest.synth.ideal import IdealPrediction, _ephys_record, _queries, _records, ephys_counts, summarize
from ingest.synth.ideal_ophys import subset_units
from ingest.synth.schedule import TASK_CODE
from shards import manifest
from shards.schema import TASKS
from shards.store import Store
from shards.stream.plan import train_subset

LOG_SD = 0.5  # the generator's log-normal spread of gains and baselines (generative.draw_units)
LOG_SHIFT = -0.125  # and the mean of their logs, relative to log(gain_hz) / log(baseline_hz)
MAX_STEPS = 40
TOL = 1e-6  # stop when no unit's objective improves by more than this (relative)


@dataclasses.dataclass
class TrainData:
    """One record's train presentations: counts and window lengths (P, U), NaN-free with a presence mask."""

    counts: np.ndarray
    durations: np.ndarray  # 0 where the unit is absent from the presentation's chunk
    task: np.ndarray  # (P,) TASK_CODE
    label: np.ndarray  # (P,)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def train_data(truth: SessionTruth, unit_index: np.ndarray, samples) -> TrainData:
    """Counts of the record's units (``unit_index`` into the truth) in every scored presentation of ``samples``."""
    where = {str(truth.unit_ids[i]): k for k, i in enumerate(unit_index)}
    lat = truth.units.latency_s[unit_index]
    parts: dict[str, list] = defaultdict(list)
    for s in samples:
        cols = np.asarray([where[str(u)] for u in s.meta["units"]], dtype=np.int64)
        for task, (start, end, label, _) in _queries(s.meta).items():
            c, d = ephys_counts(np.asarray(s.arrays["spike_times"]), np.asarray(s.arrays["spike_units"]), lat[cols],
                                start, end, s.meta["t_start"], s.meta["t_end"])
            counts, durs = np.zeros((len(label), len(unit_index))), np.zeros((len(label), len(unit_index)))
            counts[:, cols], durs[:, cols] = c, d
            parts["counts"].append(counts)
            parts["durations"].append(durs)
            parts["task"].append(np.full(len(label), TASK_CODE[task]))
            parts["label"].append(label)
    if not parts:
        raise ValueError("no labelled train presentations to fit the units on")
    return TrainData(**{k: np.concatenate(v) for k, v in parts.items()})


def _region_arrays(truth: SessionTruth, units: UnitParams) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's region projection (U, d, d) and mean preference (U, d)."""
    return (np.stack([truth.model.regions[r].projection for r in units.region]),
            np.stack([truth.model.regions[r].mean for r in units.region]))


def _design(truth: SessionTruth, units: UnitParams, proj: np.ndarray, mean: np.ndarray,
            data: TrainData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per presentation and unit: the projected code ``C`` (P, U, dim) times the task gain, the mean-preference
    drive ``tg * mu . C`` (P, U), and whether the presentation shows a stimulus at all (the natural-scenes blank
    is the baseline)."""
    names = list(TASK_CODE)
    n_p = data.counts.shape[0]
    dim = truth.config.code_dim
    code = np.zeros((n_p, dim))
    shown = np.ones(n_p, dtype=bool)
    for t in np.unique(data.task):
        m = data.task == t
        table = truth.model.codes[names[t]]
        lab = data.label[m]
        blank = lab >= len(table)  # the natural-scenes blank: no code
        code[np.nonzero(m)[0][~blank]] = table[lab[~blank]]
        shown[np.nonzero(m)[0][blank]] = False
    tg = units.task_gain[:, data.task].T  # (P, U)
    c = np.einsum("uij,pj->pui", proj, code) * tg[:, :, None]  # (P, U, d): P_u code_p, times the task gain
    return c, np.einsum("ui,pui->pu", mean, c), shown


def fit_units(truth: SessionTruth, unit_index: np.ndarray, data: TrainData) -> UnitParams:
    """MAP estimates of the record's units' own parameters given everything the corpus shares (module doc)."""
    cfg = truth.config
    units = subset_units(truth.units, unit_index)
    proj, mean = _region_arrays(truth, units)
    c, drive0, shown = _design(truth, units, proj, mean, data)
    n, d = data.counts, data.durations
    n_u, dim = len(unit_index), cfg.code_dim
    prior_mean = np.concatenate([np.zeros(dim), [np.log(cfg.ephys_gain_hz) + LOG_SHIFT,
                                                  np.log(cfg.ephys_baseline_hz) + LOG_SHIFT]])
    prior_prec = np.concatenate([np.full(dim, 1.0 / cfg.tuning_spread ** 2), np.full(2, 1.0 / LOG_SD ** 2)])
    theta = np.tile(prior_mean, (n_u, 1))  # (U, dim + 2): y, log gain, log baseline

    def objective(th: np.ndarray) -> tuple[np.ndarray, ...]:
        y, g, b = th[:, :dim], np.exp(th[:, dim]), np.exp(th[:, dim + 1])
        a = drive0 + np.einsum("ui,pui->pu", y, c)
        sp = np.where(shown[:, None], softplus(a), 0.0)
        lam = d * (b + g * sp)
        ok = d > 0
        nll = np.where(ok, lam - n * np.log(np.where(ok, lam, 1.0)), 0.0).sum(0)
        return nll + 0.5 * (prior_prec * (th - prior_mean) ** 2).sum(1), a, sp, lam, ok, g, b

    f, a, sp, lam, ok, g, b = objective(theta)
    for _ in range(MAX_STEPS):
        sig = np.where(shown[:, None], _sigmoid(a), 0.0)
        jac = np.concatenate([(d * g * sig)[:, :, None] * c, (d * g * sp)[:, :, None], (d * b)[:, :, None]], axis=2)
        inv = np.where(ok, 1.0 / np.where(ok, lam, 1.0), 0.0)
        grad = np.einsum("pu,puk->uk", np.where(ok, 1.0 - n * inv, 0.0), jac) + prior_prec * (theta - prior_mean)
        fisher = np.einsum("pu,puk,pul->ukl", inv, jac, jac) + np.diag(prior_prec)[None]
        step = np.linalg.solve(fisher, grad[:, :, None])[:, :, 0]
        scale = np.ones(n_u)
        for _ in range(20):  # halve each unit's step until its objective does not rise
            trial = theta - scale[:, None] * step
            f_new, a, sp, lam, ok, g, b = objective(trial)  # kept: the accepted step's terms
            worse = f_new > f + 1e-12 * np.abs(f)
            if not worse.any():
                break
            scale = np.where(worse, scale / 2, scale)
        done = np.all(f - f_new <= TOL * np.abs(f))
        theta, f = trial, f_new
        if done:
            break
    w = np.einsum("uji,uj->ui", proj, mean + theta[:, :dim])  # P^T (mu + y)
    return dataclasses.replace(units, w=w, gain=np.exp(theta[:, dim]), baseline=np.exp(theta[:, dim + 1]))


def with_codes(truth: SessionTruth, codes: dict[str, np.ndarray]) -> SessionTruth:
    """``truth`` with another stimulus code (the regions' tuning and the units kept)."""
    return dataclasses.replace(truth, model=CorpusModel(codes=dict(codes), regions=truth.model.regions))


def form_only(truth: SessionTruth) -> SessionTruth:
    """``truth`` as an observer sees it that is told only the generator's form, not the regions' tuning: every
    region's projection the identity and its mean preference 0 (so a unit's preference is its own ``y``, under
    the same N(0, tuning_spread^2) prior), every unit's task gain the session's mean for that task, every latency
    the corpus's mean. Units' own parameters (``w``, gain, baseline) are left for the caller to replace."""
    d = truth.config.code_dim
    regions = {k: dataclasses.replace(r, projection=np.eye(d), mean=np.zeros(d))
               for k, r in truth.model.regions.items()}
    u = truth.units
    units = dataclasses.replace(u, task_gain=np.broadcast_to(u.task_gain.mean(0), u.task_gain.shape).copy(),
                                latency_s=np.full(len(u.latency_s), truth.config.latency_s))
    return dataclasses.replace(truth, model=dataclasses.replace(truth.model, regions=regions), units=units)


def new_session_predictions(store: str, truth_dir: str, sessions: list[str] | None = None, split: str = "test",
                            train_fraction: float = 1.0, seed: int = 0,
                            codes: dict[str, np.ndarray] | None = None,
                            told_form_only: bool = False) -> list[IdealPrediction]:
    """Every labelled presentation of ``split`` of the EPhys records of ``sessions``, decoded with unit parameters
    fit on the record's train split (``train_fraction``: the seeded share of its train chunks a run with
    ``--train-fraction`` trains on; ``seed`` that run's seed). ``codes`` (task -> (classes, code_dim)): a stimulus
    code to use for the fit and the decoding instead of the true one (:mod:`ingest.synth.code_fit`);
    ``told_form_only``: not told the regions' tuning either (:func:`form_only`)."""
    st = Store(store)
    tables = manifest.load(st)
    records = [r for r in _records(tables, Path(truth_dir), sessions) if r.modality == "ephys"]
    chunks = tables.chunks.to_pandas()
    train = chunks[train_subset(chunks, (chunks.split == "train").to_numpy(), train_fraction, seed)]
    out: list[IdealPrediction] = []
    by_stem: dict[Path, list] = defaultdict(list)
    for r in records:
        by_stem[r.stem].append(r)
    for stem, recs in by_stem.items():
        truth = SessionTruth.load(stem)
        if told_form_only:
            truth = form_only(truth)
        if codes is not None:
            truth = with_codes(truth, codes)
        index = {str(u): i for i, u in enumerate(truth.unit_ids)}
        for rec in recs:
            unit_index = np.asarray([index[u] for u in rec.local_ids], dtype=np.int64)
            data = train_data(truth, unit_index, manifest.record_samples(st, train, rec.session, rec.region, "train"))
            fitted = fit_units(truth, unit_index, data)
            units = dataclasses.replace(truth.units, **{k: np.asarray(v).copy() for k, v in vars(truth.units).items()})
            for field in ("w", "gain", "baseline"):
                getattr(units, field)[unit_index] = getattr(fitted, field)
            known = dataclasses.replace(truth, units=units)
            out += _ephys_record(known, rec, manifest.record_samples(st, chunks, rec.session, rec.region, split))
    return out


def new_session_observer(store: str, truth_dir: str, sessions: list[str] | None = None, split: str = "test",
                         train_fraction: float = 1.0, seed: int = 0) -> list:
    """The new-session observer's accuracy per EPhys record and task (``ingest.synth.ideal.IdealResult`` rows)."""
    return summarize(new_session_predictions(store, truth_dir, sessions, split, train_fraction, seed))


def main(argv: list[str] | None = None) -> int:
    """``python -m ingest.synth.new_session --store STORE --truth DIR``: its table beside the ideal observer's."""
    import sys

    from ingest.synth.ideal import ideal_observer, observer_parser

    p = observer_parser("ingest.synth.new_session", __doc__)
    p.add_argument("--sessions", default=None, help="comma-separated store session ids (default: all EPhys)")
    p.add_argument("--train-fraction", type=float, default=1.0, help="share of each record's train chunks to fit on")
    p.add_argument("--seed", type=int, default=0, help="seed of the train-fraction draw (a run's --seed)")
    a = p.parse_args(argv)
    sessions = a.sessions.split(",") if a.sessions else None
    try:
        fitted = new_session_observer(a.store, a.truth, sessions, "test", a.train_fraction, a.seed)
        ideal = {(r.session, r.region, r.task): r for r in ideal_observer(a.store, a.truth, "test", sessions)}
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'session':28} {'region':8} {'task':18} {'n':>5} {'chance':>7} {'ideal':>7} {'fitted':>7}")
    per_task: dict[str, list] = defaultdict(list)
    for r in fitted:
        i = ideal[(r.session, r.region, r.task)].accuracy
        per_task[r.task].append((i, r.accuracy))
        print(f"{r.session:28} {r.region:8} {r.task:18} {r.n:5d} {1 / TASKS[r.task].n_classes:7.3f} {i:7.3f} "
              f"{r.accuracy:7.3f}")
    for task, v in per_task.items():
        i, f = np.mean(v, axis=0)
        print(f"mean over {len(v)} records {'':17} {task:18} {'':5} {'':7} {i:7.3f} {f:7.3f}  ({f / i:.2f} of ideal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
