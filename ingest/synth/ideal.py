"""The ideal observer: the best accuracy any decoder can reach on the presentations a model is scored on.

Why: a training run is judged against the optimum, not against chance, so the optimum must be
computed on *exactly* the data the model sees: the store's chunks of one split, each
presentation decoded from the one chunk that holds its midpoint (the query time the stream
uses), with nothing from outside that chunk, and with the true generative parameters from the
truth files (``<stem>.truth.json/.npz`` beside the NWB files).

Per record (store session x region) and task, over the labelled presentations (label >= 0):

- **EPhys: exact.** Given the class, a unit's spike count in its response window
  ``[start + latency_u, end + latency_u)`` (intersected with the chunk) is Poisson with mean
  ``duration * class_rates[u, class]``, independently across units; every other spike of the
  chunk falls where the rate does not depend on this presentation's class, so it carries no
  information. With a flat prior over the task's classes the Bayes decoder is the argmax of
  ``sum_u n_u log r_uc - d_u r_uc``, and its accuracy on these presentations is the Bayes
  accuracy (ties, if any, get fractional credit: the expected accuracy of random tie-breaking).
- **OPhys: bracketed** (the exact posterior marginalises over all spike histories).
  *Lower bound*: the accuracy of a real decoder that knows the truth: a Gaussian (LDA-like)
  likelihood of the dF/F of each ROI in the frames from onset to ``TAIL_S`` after offset, with
  the mean given the class (kernel x this presentation's rate, plus every other presentation at
  its prior-mean rate) and a covariance from Poisson variance through the kernel, the
  neighbours' unknown classes (rank-one terms) and the noise. It reduces to a matched filter:
  two scalars per ROI. Back-to-back 0.25-s presentations overlap in the calcium, so the decoder
  then re-decodes ``FEEDBACK_PASSES`` times with every neighbour at its posterior-mean rate
  instead of the prior mean (decision feedback; +7 points on natural scenes). It reads only the
  chunk's dF/F. Any decoder's accuracy is at most Bayes', so this is a valid lower bound.
  *Upper bound*: the exact Poisson Bayes accuracy on the ROIs' true latent spike counts in the
  frames overlapping the response window (up to the chunk's last frame), with the neighbours'
  true classes given. The chunk's dF/F is a noisy function of those counts and of counts whose
  law does not depend on this class, so by the data-processing inequality (Blackwell) Bayes on
  the counts is at least Bayes on the dF/F. The counts are redrawn exactly as the generator
  drew them (:func:`ingest.synth.corpus.ophys_latent`). Both are in :mod:`.ideal_ophys`.

Both bounds hold for expected accuracy; the numbers are measured on n presentations, so each
carries a binomial error of about sqrt(p (1 - p) / n). Where dF/F loses little (drifting gratings:
2 s on, 1 s gray) the bounds nearly meet and a few dozen presentations can put the lower one a
presentation or two above the upper one. The prior is flat and independent per
presentation (the schedule's permutation structure, which a decoder could exploit across
presentations, is ignored on purpose: the benchmark is about decoding neural data).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.synth.generative import GENERATOR_VERSION, SessionTruth, class_rates
from ingest.synth.ideal_ophys import OphysSession, ophys_sample, subset_units
from ingest.synth.schedule import TASK_NAMES
from shards import manifest
from shards.schema import TASKS
from shards.store import Store


@dataclass
class IdealResult:
    """Accuracy of the ideal observer on one record (store session x region) and task."""

    session: str
    modality: str
    task: str
    accuracy: float  # EPhys: exact Bayes accuracy; OPhys: the lower bound (a real decoder)
    upper: float | None  # OPhys: an upper bound; None for EPhys
    n: int  # presentations scored
    region: str = ""


@dataclass
class IdealPrediction:
    """One scored presentation, identified by (session, region, task, start)."""

    session: str
    region: str
    modality: str
    task: str
    start: float
    label: int
    pred: int  # argmax of loglik
    correct: float  # 1, 0, or 1/k when the label is among k tied maxima
    loglik: np.ndarray  # (n_classes,) log-likelihood up to a class-independent constant
    pred_upper: int | None = None  # OPhys: Bayes on the latent counts
    correct_upper: float | None = None


@dataclass
class _Record:
    session: str
    region: str
    modality: str
    stem: Path  # truth files are <stem>.truth.json / .npz
    local_ids: list[str]


# ---- inputs, all checked before any work ---------------------------------------------------------
def _records(tables: manifest.StoreTables, truth_dir: Path, sessions: list[str] | None) -> list[_Record]:
    rows = tables.sessions.to_pylist()
    known = {r["session_id"] for r in rows}
    if sessions is not None:
        missing = sorted(set(sessions) - known)
        if missing:
            raise ValueError(f"sessions not in the store: {', '.join(missing)}")
        rows = [r for r in rows if r["session_id"] in set(sessions)]
    units = defaultdict(list)
    for u in tables.units.select(["session_id", "region", "local_id"]).to_pylist():
        units[(u["session_id"], u["region"])].append(u["local_id"])
    out, metas = [], {}
    for r in rows:
        name = r["source_file"].rstrip("/").rsplit("/", 1)[-1].removesuffix(".nwb")
        stem = truth_dir / name
        js = Path(f"{stem}.truth.json")
        if stem not in metas:
            if not js.is_file() or not Path(f"{stem}.truth.npz").is_file():
                raise ValueError(f"{js}: no truth file (.truth.json and .npz) for store session {r['session_id']}")
            meta = json.loads(js.read_text())
            version = meta.get("generator_version", 1)
            if version != GENERATOR_VERSION:
                raise ValueError(f"{js}: written by generator version {version}, this observer needs "
                                 f"{GENERATOR_VERSION} (regenerate the corpus)")
            metas[stem] = meta
        meta = metas[stem]
        if meta["modality"] != r["modality"]:
            raise ValueError(f"{js}: truth is {meta['modality']}, store session {r['session_id']} is {r['modality']}")
        ids = units[(r["session_id"], r["region"])]
        have = {str(u["id"]) for u in meta["units"]}
        lost = [u for u in ids if u not in have]
        if lost:
            raise ValueError(f"{js}: {len(lost)} units of store session {r['session_id']}/{r['region']} are not in "
                             f"the truth (e.g. {lost[0]})")
        out.append(_Record(r["session_id"], r["region"], r["modality"], stem, ids))
    return out


def _queries(meta: dict, scored_only: bool = True) -> dict[str, tuple]:
    """task -> (start, end, label, scored) of the chunk's labelled presentations; scored = midpoint in the chunk.
    ``scored_only``: only those (the others are kept for decoders that model neighbours)."""
    st = meta["stimuli"]
    task = np.asarray(st["task"], dtype=str)
    start, end = np.asarray(st["start"], dtype=np.float64), np.asarray(st["end"], dtype=np.float64)
    label = np.asarray(st["label"], dtype=np.int64)
    mid = (start + end) / 2
    scored = (mid >= meta["t_start"]) & (mid < meta["t_end"])
    ok = (label >= 0) & (scored | (not scored_only))
    return {t: (start[m], end[m], label[m], scored[m]) for t in TASK_NAMES if (m := ok & (task == t)).any()}


def _credit(ll: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """argmax and tie-aware credit per row."""
    top = ll.max(axis=1, keepdims=True)
    tied = ll >= top - 1e-9 * (1.0 + np.abs(top))
    return ll.argmax(axis=1), tied[np.arange(len(label)), label] / tied.sum(axis=1)


# ---- EPhys: exact --------------------------------------------------------------------------------
def ephys_counts(spike_times: np.ndarray, spike_units: np.ndarray, latency: np.ndarray,
                 start: np.ndarray, end: np.ndarray, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
    """Spike counts and window lengths (n_presentations, n_units) of one chunk's presentations.

    ``spike_units`` index ``latency`` (n_units,); windows are ``[start + latency, end + latency)`` clipped
    to the chunk ``[t0, t1)``.
    """
    lo = np.clip(start[:, None] + latency[None, :], t0, t1)
    hi = np.clip(end[:, None] + latency[None, :], t0, t1)
    counts = np.zeros(lo.shape)
    for u in range(len(latency)):
        t = spike_times[spike_units == u]
        counts[:, u] = np.searchsorted(t, hi[:, u], side="left") - np.searchsorted(t, lo[:, u], side="left")
    return counts, np.maximum(hi - lo, 0.0)


def ephys_loglik(spike_times: np.ndarray, spike_units: np.ndarray, latency: np.ndarray, rates: np.ndarray,
                 start: np.ndarray, end: np.ndarray, t0: float, t1: float) -> np.ndarray:
    """(n_presentations, n_classes) Poisson log-likelihood (minus class-independent terms) of one chunk
    (``rates`` (n_units, n_classes); the windows of :func:`ephys_counts`)."""
    counts, durations = ephys_counts(spike_times, spike_units, latency, start, end, t0, t1)
    return counts @ np.log(rates) - durations @ rates


def _ephys_record(truth: SessionTruth, rec: _Record, samples: Iterator) -> list[IdealPrediction]:
    index = {str(u): i for i, u in enumerate(truth.unit_ids)}
    out = []
    for s in samples:
        idx = np.asarray([index[u] for u in s.meta["units"]], dtype=np.int64)
        sub = subset_units(truth.units, idx)
        for task, (start, end, label, _) in _queries(s.meta).items():
            ll = ephys_loglik(np.asarray(s.arrays["spike_times"]), np.asarray(s.arrays["spike_units"]),
                              sub.latency_s, class_rates(sub, truth.model, task), start, end,
                              s.meta["t_start"], s.meta["t_end"])
            pred, credit = _credit(ll, label)
            out += [IdealPrediction(rec.session, rec.region, "ephys", task, float(a), int(y), int(p), float(c), lk)
                    for a, y, p, c, lk in zip(start, label, pred, credit, ll)]
    return out


def _ophys_record(sess: OphysSession, rec: _Record, samples: Iterator) -> list[IdealPrediction]:
    out = []
    for s in samples:
        for task, start, label, low, up in ophys_sample(sess, s, _queries(s.meta, scored_only=False)):
            pred, credit = _credit(low, label)
            pu, cu = _credit(up, label)
            out += [IdealPrediction(rec.session, rec.region, "ophys", task, float(a), int(y), int(p), float(c), lk,
                                    int(q), float(e))
                    for a, y, p, c, lk, q, e in zip(start, label, pred, credit, low, pu, cu)]
    return out


# ---- entry points --------------------------------------------------------------------------------
def ideal_predictions(store: str, truth_dir: str, split: str = "test",
                      sessions: list[str] | None = None) -> list[IdealPrediction]:
    """Every labelled presentation of ``split`` in the store, decoded by the ideal observer (see the module doc)."""
    st = Store(store)
    tables = manifest.load(st)
    records = _records(tables, Path(truth_dir), sessions)
    by_stem: dict[Path, list[_Record]] = defaultdict(list)
    for r in records:
        by_stem[r.stem].append(r)
    chunks = tables.chunks.to_pandas()
    out: list[IdealPrediction] = []
    for stem, recs in by_stem.items():
        truth = SessionTruth.load(stem)
        sess = OphysSession(truth) if truth.modality == "ophys" else None
        for rec in recs:
            samples = manifest.record_samples(st, chunks, rec.session, rec.region, split)
            out += _ophys_record(sess, rec, samples) if sess is not None else _ephys_record(truth, rec, samples)
        del sess
    return out


def summarize(preds: list[IdealPrediction]) -> list[IdealResult]:
    """Accuracy per (session, region, task)."""
    groups: dict[tuple, list[IdealPrediction]] = defaultdict(list)
    for p in preds:
        groups[(p.session, p.region, p.modality, p.task)].append(p)
    out = []
    for (session, region, modality, task), ps in sorted(groups.items()):
        upper = float(np.mean([p.correct_upper for p in ps])) if modality == "ophys" else None
        out.append(IdealResult(session, modality, task, float(np.mean([p.correct for p in ps])), upper, len(ps),
                               region))
    return out


def ideal_observer(store: str, truth_dir: str, split: str = "test",
                   sessions: list[str] | None = None) -> list[IdealResult]:
    """Ideal-observer accuracy per record (store session x region) and task on ``split`` (see the module doc)."""
    return summarize(ideal_predictions(store, truth_dir, split, sessions))


def format_results(results: list[IdealResult]) -> str:
    """A plain table: one line per record and task, chance beside each."""
    lines = [f"{'session':28} {'region':8} {'task':18} {'n':>5} {'chance':>7} {'ideal':>7} {'upper':>7}"]
    for r in results:
        up = "" if r.upper is None else f"{r.upper:7.3f}"
        lines.append(f"{r.session:28} {r.region:8} {r.task:18} {r.n:5d} {1 / TASKS[r.task].n_classes:7.3f} "
                     f"{r.accuracy:7.3f} {up:>7}")
    return "\n".join(lines)


def summary_table(results: list[IdealResult]) -> str:
    """Mean [min, max] over records per modality and task."""
    groups: dict[tuple, list[IdealResult]] = defaultdict(list)
    for r in results:
        groups[(r.modality, r.task)].append(r)
    lines = [f"{'modality':8} {'task':18} {'records':>7} {'n/record':>8} {'ideal (mean [min, max])':>24} "
             f"{'upper (mean [min, max])':>24}"]
    for (mod, task), rs in sorted(groups.items()):
        acc = np.asarray([r.accuracy for r in rs])
        up = np.asarray([r.upper for r in rs if r.upper is not None])
        cell = lambda v: f"{v.mean():.3f} [{v.min():.2f}, {v.max():.2f}]" if len(v) else "-"  # noqa: E731
        lines.append(f"{mod:8} {task:18} {len(rs):7d} {np.mean([r.n for r in rs]):8.0f} {cell(acc):>24} {cell(up):>24}")
    return "\n".join(lines)


def observer_parser(module: str, doc: str):
    """The command line every observer module opens with: ``python -m MODULE --store STORE --truth DIR``."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", required=True, help="shard store (local folder or s3://...)")
    p.add_argument("--truth", required=True, help="folder with the <stem>.truth.json/.npz files (the synth --out)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m ingest.synth.ideal --store STORE --truth DIR``: the ideal observer's table."""
    import sys
    from dataclasses import asdict

    p = observer_parser("ingest.synth.ideal", __doc__)
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--sessions", default=None, help="comma-separated store session ids (default: all)")
    p.add_argument("--json", default=None, help="also write the per-record results here")
    a = p.parse_args(argv)
    try:
        res = ideal_observer(a.store, a.truth, a.split, a.sessions.split(",") if a.sessions else None)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_results(res) + "\n\n" + summary_table(res))
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in res], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
