"""The ceiling of the likelihood readout's OPhys form: its statistic and Gaussian with every ROI's TRUE class rates.

    python bench/readout_ceiling.py --store W/cpu/store --truth W/cpu/nwb --sessions ophys_synth-ophys-005

The readout (trainer/model/likelihood.py, docs/model.md section 19) scores an OPhys query by each ROI's summed calcium
innovations over the presentation's span, ``S = sum_k x_k - exp(-dt / tau) x_(k-1)`` over the 3-frame tokens in
[onset + shift, offset + shift), under ``N(o k + A T rate_c, s^2 k + A^2 T rate_c)``. Here the rates are the
generator's own (``class_rates``) and the decay its ``tau_decay_s``; the offset ``o``, amplitude ``A`` and noise
``s`` of each ROI are fit on the record's train split by least squares (the best the form can do with them), and the
test split is decoded. What separates the model from this ceiling is the fit of the rates (learning); what
separates this ceiling from the ideal observer's lower bound (a matched filter over the presentation and its tail with
decision feedback for the neighbours, ``ingest.synth.ideal_ophys``) is the form itself, and that bound is this
bench's anchor, computed in the same run on the same presentations (the table's ratio). The tokens are binned from
each sample's first frame (the stream bins from each window's: the same phase statistics). Writes
``bench/results/readout_ceiling.json`` (``{"ceiling": {session: {shift: {task: acc}}}, "ideal_lower": {session:
{task: acc}}, "n": ..., "shifts": ...}``; with ``--before`` also ``"ceiling_before"``: the form with each span's sum
conditioned on the innovation of the token before it, ``likelihood_ophys_before``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.synth.generative import SessionTruth, class_rates  # noqa: E402
from ingest.synth.ideal import _queries, ideal_observer  # noqa: E402
from ingest.synth.ideal_ophys import subset_units  # noqa: E402
from shards import manifest  # noqa: E402
from shards.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def spans(store: Store, chunks, truth: SessionTruth, session: str, split: str, shift: float, frames_per_token: int):
    """{task: [(S (J,), k, T, label, rates (J, C), ROI indices (J,), d_b (J,))]} of the split's scored presentations
    (``d_b``: each ROI's innovation of the token before the span, 0 where the span starts at the sample's first)."""
    index = {str(u): i for i, u in enumerate(truth.unit_ids)}
    out: dict[str, list] = {}
    for region in sorted(chunks[chunks.session_id == session].region.unique()):
        for s in manifest.record_samples(store, chunks, session, region, split):
            idx = np.asarray([index[u] for u in s.meta["units"]])
            tau = np.asarray(truth.ophys["tau_decay_s"])[idx]
            ft = np.asarray(s.arrays["frame_times"])
            dff = np.asarray(s.arrays["dff"], dtype=np.float64)
            nb = len(ft) // frames_per_token
            x = dff[:nb * frames_per_token].reshape(nb, frames_per_token, -1).mean(1)
            tb = ft[:nb * frames_per_token:frames_per_token]
            d = x[1:] - np.exp(-np.diff(tb)[:, None] / tau[None, :]) * x[:-1]
            td = tb[1:]
            units = subset_units(truth.units, idx)
            for task, (start, end, label, _) in _queries(s.meta).items():
                rates = class_rates(units, truth.model, task)
                for p in range(len(start)):
                    m = (td >= start[p] + shift) & (td < end[p] + shift)
                    if m.any():
                        first = int(np.argmax(m))
                        d_b = d[first - 1] if first > 0 else np.zeros(d.shape[1])
                        out.setdefault(task, []).append((d[m].sum(0), int(m.sum()), end[p] - start[p], label[p],
                                                         rates, idx, d_b))
    return out


def fit(train: dict[str, list], before: bool = False) -> dict[int, tuple[float, float, float, float]]:
    """Each ROI's (o, A, s^2, beta) by least squares of S on (k, T rate_label[, d_b]) over every task's train
    presentations (beta 0 without ``before``)."""
    xs: dict[int, list] = {}
    ys: dict[int, list] = {}
    for rows in train.values():
        for s, k, t, y, rates, idx, d_b in rows:
            for jj, j in enumerate(idx):
                xs.setdefault(int(j), []).append((k, t * rates[jj, y], *([d_b[jj]] if before else [])))
                ys.setdefault(int(j), []).append(s[jj])
    out = {}
    for j, x in xs.items():
        a, y = np.asarray(x), np.asarray(ys[j])
        coef = np.linalg.lstsq(a, y, rcond=None)[0]
        res = y - a @ coef
        s2 = max(float(np.mean((res ** 2 - coef[1] ** 2 * a[:, 1]) / a[:, 0])), 1e-8)
        out[j] = (float(coef[0]), float(coef[1]), s2, float(coef[2]) if before else 0.0)
    return out


def decode(test: dict[str, list], par: dict[int, tuple[float, float, float, float]]) -> dict[str, tuple[float, int]]:
    """{task: (accuracy, presentations)} of the form's Gaussian with the true rates."""
    out = {}
    for task, rows in test.items():
        hits = []
        for s, k, t, y, rates, idx, d_b in rows:
            o, amp, s2, beta = (np.array([par[int(j)][i] for j in idx]) for i in range(4))
            mean = o[:, None] * k + amp[:, None] * t * rates + (beta * d_b)[:, None]
            var = s2[:, None] * k + amp[:, None] ** 2 * t * rates
            ll = (-(s[:, None] - mean) ** 2 / (2 * var) - 0.5 * np.log(var)).sum(0)
            hits.append(ll.argmax() == y)
        out[task] = (float(np.mean(hits)), len(hits))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--truth", required=True, help="the folder of the NWB files and their truth files")
    p.add_argument("--sessions", required=True, help="comma separated OPhys session ids")
    p.add_argument("--shifts", default="0.05,0.07,0.1,0.13", help="span shifts (s) after onset and offset")
    p.add_argument("--frames-per-token", type=int, default=3)
    p.add_argument("--before", action="store_true",
                   help="also the form conditioned on the innovation before the span (likelihood_ophys_before)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "readout_ceiling.json"))
    a = p.parse_args(argv)
    store = Store(a.store)
    chunks = manifest.load(store).chunks.to_pandas()
    shifts = [float(x) for x in a.shifts.split(",")]
    sessions = a.sessions.split(",")
    ideal = {}
    for r in ideal_observer(a.store, a.truth, split="test", sessions=sessions):
        ideal.setdefault(r.session, {})[r.task] = r.accuracy
    forms = {"ceiling": False, **({"ceiling_before": True} if a.before else {})}
    result: dict = {**{f: {} for f in forms}, "ideal_lower": ideal, "n": {}, "shifts": shifts,
                    "frames_per_token": a.frames_per_token}
    print(f"{'session':24s} {'shift':>6s} {'task':20s} {'ceiling':>8s} "
          + ("{:>8s} ".format("before") if a.before else "") + f"{'ideal':>7s} {'ratio':>6s} {'n':>5s}")
    for session in sessions:
        truth = SessionTruth.load(Path(a.truth) / session)
        for shift in shifts:
            args = (store, chunks, truth, session)
            test, train = (spans(*args, split, shift, a.frames_per_token) for split in ("test", "train"))
            accs = {f: decode(test, fit(train, before)) for f, before in forms.items()}
            for task, (v, n) in sorted(accs["ceiling"].items()):
                for f, acc in accs.items():
                    result[f].setdefault(session, {}).setdefault(str(shift), {})[task] = acc[task][0]
                result["n"].setdefault(session, {})[task] = n
                lower = ideal.get(session, {}).get(task, float("nan"))
                extra = f"{accs['ceiling_before'][task][0]:8.3f} " if a.before else ""
                print(f"{session:24s} {shift:6.2f} {task:20s} {v:8.3f} {extra}{lower:7.3f} {v / lower:6.2f} {n:5d}")
    Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
