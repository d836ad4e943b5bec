"""The corpus observer: the new-session observer with the stimulus code *learnt from the pretraining sessions*
instead of told. It bounds what pretraining on a corpus of this size can carry over.

Why: the ideal and the new-session observers (:mod:`ingest.synth.new_session`) know the generator's true code for
every (task, class). A pretrained model learns that code from the pretraining sessions' spikes, and on the
benchmark corpus those are three EPhys sessions of 20 min, with drifting gratings the weakest-tuned task (rates
differ by ~0.5 Hz across its 8 directions). Can so little data pin the code? By default this observer is told only
the generator's *form* (:func:`ingest.synth.new_session.form_only`: no region's projection, mean preference or
task gains, each task's mean sharpness instead, one latency) and the priors of units' parameters. It starts from a
random code and fits, in turn, the pretraining units' 10 numbers each (as the new-session observer fits a unit)
and the code (``joint`` rounds, ``JOINT_ROUNDS``), all on the pretraining sessions' train split; then it treats
the held-out session as the new-session observer does (its units fit on their train split, its test split decoded
by the ideal's decoder) with that code. On the benchmark's held-out session it reaches 1.00 / 0.94 / 0.97 of the
ideal (docs/model.md section 24): what a pretraining that fits the encoding model to convergence could carry over.
``joint=0`` tells it the pretraining units instead (the code is then fit in the truth's coordinates and can be
compared with the true one); ``told_form_only=False`` tells it the regions' tuning too.

Given the units, the fit of the code is exact and small: a class's code enters only the rates of that class's
presentations, ``rate_u = b_u + g_u softplus(x_u . code_c)`` with ``x_u = task_gain_u w_u``, so each class is its
own Poisson regression on the counts summed over its presentations (``code_dim`` numbers from every unit of every
pretraining record), solved by Fisher scoring with step halving as :func:`ingest.synth.new_session.fit_units` is.
Codes and units are identifiable only up to a shared linear map, which no decoder sees. EPhys only: OPhys would
need the fit through the calcium kernel and noise (the model also learns from the pretraining planes, so on that
count this observer knows less than the model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ingest.synth.generative import CorpusModel, SessionTruth, UnitParams, softplus
from ingest.synth.ideal import IdealPrediction, _records, observer_parser, summarize
from ingest.synth.ideal_ophys import subset_units
from ingest.synth.new_session import (
    TrainData,
    _sigmoid,
    fit_units,
    form_only,
    new_session_predictions,
    train_data,
    with_codes,
)
from ingest.synth.schedule import TASK_CODE
from shards import manifest
from shards.store import Store
from shards.stream.plan import train_subset

JOINT_ROUNDS = 10  # measured: 10 and 30 rounds decode the benchmark's held-out session alike (within 0.001)
MAX_STEPS = 50
TOL = 1e-9  # stop when no class's objective improves by more than this (relative)


@dataclasses.dataclass
class ClassCounts:
    """One task's evidence about its codes, summed over presentations: per (unit, class) spike counts and seconds
    of response window, and each unit's regressor ``x = task_gain * w``, gain and baseline (units of every record
    stacked)."""

    counts: np.ndarray  # (U, C)
    seconds: np.ndarray  # (U, C)
    x: np.ndarray  # (U, code_dim)
    gain: np.ndarray  # (U,)
    baseline: np.ndarray  # (U,)


def fit_class_codes(ev: ClassCounts) -> np.ndarray:
    """(C, code_dim) maximum-likelihood codes of one task from its summed counts (module doc), started at 0."""
    n, s, x, g, b = ev.counts, ev.seconds, ev.x, ev.gain[:, None], ev.baseline[:, None]
    code = np.zeros((n.shape[1], x.shape[1]))

    def objective(c: np.ndarray) -> tuple[np.ndarray, ...]:
        a = x @ c.T  # (U, C)
        rate = b + g * softplus(a)
        return (s * rate - n * np.log(rate)).sum(0), a, rate

    f, a, rate = objective(code)
    for _ in range(MAX_STEPS):
        slope = g * _sigmoid(a)  # d rate / d a
        grad = np.einsum("uc,ud->cd", slope * (s - n / rate), x)
        fisher = np.einsum("uc,ud,ue->cde", s * slope ** 2 / rate, x, x) + 1e-9 * np.eye(x.shape[1])[None]
        step = np.linalg.solve(fisher, grad[:, :, None])[:, :, 0]
        scale = np.ones(len(code))
        for _ in range(30):  # halve each class's step until its objective does not rise
            trial = code - scale[:, None] * step
            f_new, a, rate = objective(trial)
            worse = f_new > f + 1e-12 * np.abs(f)
            if not worse.any():
                break
            scale = np.where(worse, scale / 2, scale)
        done = np.all(f - f_new <= TOL * np.abs(f))
        code, f = trial, f_new
        if done:
            break
    return code


@dataclasses.dataclass
class RecordData:
    """One pretraining record's train presentations and where its units sit in its session's truth."""

    truth: SessionTruth
    unit_index: np.ndarray
    data: TrainData


def pretraining_data(store: str, truth_dir: str, sessions: Sequence[str], *, train_fraction: float = 1.0,
                     seed: int = 0, told_form_only: bool = False) -> list[RecordData]:
    """The train-split counts of the EPhys records of ``sessions`` (store ids); ``told_form_only``: their truths
    as :func:`ingest.synth.new_session.form_only` shows them (and the counts in its latency's windows)."""
    st = Store(store)
    tables = manifest.load(st)
    records = [r for r in _records(tables, Path(truth_dir), list(sessions)) if r.modality == "ephys"]
    if not records:
        raise ValueError(f"{store}: none of {', '.join(sessions)} is an EPhys session with ground truth")
    chunks = tables.chunks.to_pandas()
    train = chunks[train_subset(chunks, (chunks.split == "train").to_numpy(), train_fraction, seed)]
    truths: dict[Path, SessionTruth] = {}
    out = []
    for rec in records:
        if rec.stem not in truths:
            truths[rec.stem] = form_only(SessionTruth.load(rec.stem)) if told_form_only else SessionTruth.load(rec.stem)
        truth = truths[rec.stem]
        index = {str(u): i for i, u in enumerate(truth.unit_ids)}
        unit_index = np.asarray([index[u] for u in rec.local_ids], dtype=np.int64)
        samples = manifest.record_samples(st, train, rec.session, rec.region, "train")
        out.append(RecordData(truth, unit_index, train_data(truth, unit_index, samples)))
    return out


def evidence(records: Sequence[RecordData], units: Sequence[UnitParams]) -> dict[str, ClassCounts]:
    """Each task's summed evidence about its codes, the records' units taken as ``units`` (one per record, in
    its order)."""
    parts: dict[str, list[ClassCounts]] = {t: [] for t in TASK_CODE}
    for rec, u in zip(records, units, strict=True):
        d = rec.data
        for task, code in TASK_CODE.items():
            n_classes = len(rec.truth.model.codes[task])
            m = (d.task == code) & (d.label < n_classes)  # the natural-scenes blank has no code
            onehot = np.eye(n_classes)[d.label[m]]  # (P, C)
            parts[task].append(ClassCounts(counts=d.counts[m].T @ onehot, seconds=d.durations[m].T @ onehot,
                                           x=u.task_gain[:, code, None] * u.w, gain=u.gain, baseline=u.baseline))
    return {t: ClassCounts(*(np.concatenate([getattr(p, f.name) for p in ps])
                             for f in dataclasses.fields(ClassCounts)))
            for t, ps in parts.items()}


def fit_codes(records: Sequence[RecordData], *, joint: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """task -> (classes, code_dim) codes estimated from ``records`` (module doc). ``joint`` > 0: the pretraining
    units are not told either; codes (started at random) and units (their 10 numbers each, as the new-session
    observer fits them) are fit in turn, ``joint`` rounds: what a pretraining that learns both at once can reach."""
    if not joint:
        return {t: fit_class_codes(ev) for t, ev in
                evidence(records, [subset_units(r.truth.units, r.unit_index) for r in records]).items()}
    rng = np.random.default_rng(seed)
    first = records[0].truth.model
    codes = {t: rng.normal(size=c.shape) / np.sqrt(c.shape[1]) for t, c in first.codes.items()}
    for _ in range(joint):
        units = [fit_units(with_codes(r.truth, codes), r.unit_index, r.data) for r in records]
        codes = {t: fit_class_codes(ev) for t, ev in evidence(records, units).items()}
    return codes


def code_agreement(estimated: dict[str, np.ndarray], truth: CorpusModel) -> dict[str, float]:
    """Per task, the correlation over classes and dimensions of the estimated codes with the true ones."""
    return {t: float(np.corrcoef(c.ravel(), truth.codes[t].ravel())[0, 1]) for t, c in estimated.items()}


def corpus_observer_predictions(store: str, truth_dir: str, pretraining: Sequence[str], held_out: Sequence[str],
                                split: str = "test", *, joint: int = JOINT_ROUNDS, told_form_only: bool = True
                                ) -> tuple[list[IdealPrediction], dict[str, float] | None]:
    """The held-out EPhys records' ``split`` decoded by the new-session observer with the code estimated from the
    ``pretraining`` sessions (``joint`` rounds, 0: their units told; ``told_form_only``: neither the pretraining
    nor the held-out sessions' regions' tuning told, :func:`ingest.synth.new_session.form_only`), and, where the
    code is fit in the truth's coordinates (``joint`` 0), its agreement with the true code per task."""
    records = pretraining_data(store, truth_dir, pretraining, told_form_only=told_form_only)
    codes = fit_codes(records, joint=joint)
    preds = new_session_predictions(store, truth_dir, list(held_out), split, codes=codes,
                                    told_form_only=told_form_only)
    if joint:
        return preds, None  # codes and units are fit up to a shared linear map: no agreement to read
    # the corpus's true code, as the pretraining truths already loaded hold it (form_only keeps the code)
    return preds, code_agreement(codes, records[0].truth.model)


def corpus_observer(store: str, truth_dir: str, pretraining: Sequence[str], held_out: Sequence[str],
                    split: str = "test", **kw) -> tuple[list, dict[str, float] | None]:
    """Its accuracy per held-out EPhys record and task (``ingest.synth.ideal.IdealResult`` rows), and the code's
    agreement with the truth (keywords: :func:`corpus_observer_predictions`)."""
    preds, agreement = corpus_observer_predictions(store, truth_dir, pretraining, held_out, split, **kw)
    return summarize(preds), agreement


def main(argv: list[str] | None = None) -> int:
    """``python -m ingest.synth.code_fit --store S --truth DIR --pretraining A,B --held-out C``: its table."""
    import sys

    p = observer_parser("ingest.synth.code_fit", __doc__)
    p.add_argument("--pretraining", required=True, help="comma-separated store session ids the code is fit on")
    p.add_argument("--held-out", required=True, help="comma-separated store session ids to decode")
    p.add_argument("--joint", type=int, default=JOINT_ROUNDS,
                   help="rounds of fitting the pretraining units and the code in turn (0: the units are told)")
    p.add_argument("--told-regions", action="store_true",
                   help="tell the observer the regions' tuning (projections, means, task gains, latencies)")
    a = p.parse_args(argv)
    try:
        rows, agreement = corpus_observer(a.store, a.truth, a.pretraining.split(","), a.held_out.split(","),
                                          joint=a.joint, told_form_only=not a.told_regions)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if agreement is not None:
        print("code agreement with the truth: " + ", ".join(f"{t} {v:.3f}" for t, v in agreement.items()))
    print(f"{'session':28} {'region':8} {'task':18} {'n':>5} {'accuracy':>9}")
    for r in rows:
        print(f"{r.session:28} {r.region:8} {r.task:18} {r.n:5d} {r.accuracy:9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
