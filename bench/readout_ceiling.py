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
conditioned on the innovation of the token before it, ``likelihood_ophys_before``; with ``--filter`` also
``"ceiling_filter"`` and ``"ceiling_filter_nofeedback"``: the matched filter over the innovations with and without
decision feedback, ``likelihood_ophys_form=filter``, trainer/model/calcium_filter.py).

The filter's per-ROI parameters are fit on the train split with the true classes: the offset and the taps by least
squares of each innovation on the expected spikes of its interval and its neighbours' (``calcium_filter.TAPS``), the
noise variance from the residuals less their Poisson part, and its lag-1 covariance from the residuals (clipped
to +-0.49 of the variance, as the model's). The class prior mean is the classes' plain mean, as the model's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.synth.generative import SessionTruth, class_rates  # noqa: E402
from ingest.synth.ideal import _queries, ideal_observer  # noqa: E402
from ingest.synth.ideal_ophys import subset_units  # noqa: E402
from shards import manifest  # noqa: E402
from shards.store import Store  # noqa: E402
from trainer.model.calcium_filter import TAPS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def binned(store: Store, chunks, truth: SessionTruth, session: str, split: str, frames_per_token: int):
    """Per sample of the split, as the stream bins it: (sample, its ROIs' truth indices (J,), token start times (K,),
    innovations (K - 1, J): each token minus the true decay of the one before)."""
    index = {str(u): i for i, u in enumerate(truth.unit_ids)}
    for region in sorted(chunks[chunks.session_id == session].region.unique()):
        for s in manifest.record_samples(store, chunks, session, region, split):
            idx = np.asarray([index[u] for u in s.meta["units"]])
            tau = np.asarray(truth.ophys["tau_decay_s"])[idx]
            ft = np.asarray(s.arrays["frame_times"])
            dff = np.asarray(s.arrays["dff"], dtype=np.float64)
            nb = len(ft) // frames_per_token
            x = dff[:nb * frames_per_token].reshape(nb, frames_per_token, -1).mean(1)
            tb = ft[:nb * frames_per_token:frames_per_token]
            yield s, idx, tb, x[1:] - np.exp(-np.diff(tb)[:, None] / tau[None, :]) * x[:-1]


def spans(store: Store, chunks, truth: SessionTruth, session: str, split: str, shift: float, frames_per_token: int):
    """{task: [(S (J,), k, T, label, rates (J, C), ROI indices (J,), d_b (J,))]} of the split's scored presentations
    (``d_b``: each ROI's innovation of the token before the span, 0 where the span starts at the sample's first)."""
    out: dict[str, list] = {}
    for s, idx, tb, d in binned(store, chunks, truth, session, split, frames_per_token):
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


def filter_samples(store: Store, chunks, truth: SessionTruth, session: str, split: str, frames_per_token: int):
    """Per sample of the split: its innovations (K, J), the intervals they cover, its ROIs, every presentation
    (task, start, end, label; -1 a blank) and its own span (presentations scored where their midpoint is in it)."""
    for s, idx, tb, d in binned(store, chunks, truth, session, split, frames_per_token):
        st = s.meta["stimuli"]
        pres = [(str(t), float(a), float(b), int(y)) for t, a, b, y in
                zip(st["task"], st["start"], st["end"], st["label"])]
        if pres:
            yield {"d": d, "t0": tb[:-1], "t1": tb[1:], "idx": idx, "units": subset_units(truth.units, idx),
                   "pres": pres, "span": (s.meta["t_start"], s.meta["t_end"])}


def _overlaps(smp: dict, shift: float) -> np.ndarray:
    """(presentations, K) seconds of each shifted presentation in each innovation's interval."""
    st = np.array([p[1] for p in smp["pres"]]) + shift
    en = np.array([p[2] for p in smp["pres"]]) + shift
    return np.clip(np.minimum(smp["t1"][None], en[:, None]) - np.maximum(smp["t0"][None], st[:, None]), 0, None)


def _taps(lam: np.ndarray) -> np.ndarray:
    """(len(TAPS), K, J): ``out[i, k] = lam[k - TAPS[i]]`` (0 outside)."""
    out = np.zeros((len(TAPS), *lam.shape))
    for i, t in enumerate(TAPS):
        if t >= 0:
            out[i, t:] = lam[:len(lam) - t]
        else:
            out[i, :t] = lam[-t:]
    return out


def _expected(smp: dict, ov: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """(K, J) expected spikes per interval with each presentation at ``rates`` (P, J)."""
    base = smp["units"].baseline
    return base[None] * (smp["t1"] - smp["t0"])[:, None] + ov.T @ (rates - base[None])


def filter_fit(train: list[dict], truth: SessionTruth, shift: float) -> dict[int, tuple]:
    """Each ROI's (offset and taps, noise variance, lag-1 covariance) on the train split's true classes."""
    xs: dict[int, list] = {}
    ys: dict[int, list] = {}
    for smp in train:
        rates = {t: class_rates(smp["units"], truth.model, t) for t in {p[0] for p in smp["pres"]}}
        true = np.array([smp["units"].baseline if y < 0 else rates[t][:, y] for t, _, _, y in smp["pres"]])
        feats = _taps(_expected(smp, _overlaps(smp, shift), true))
        for jj, j in enumerate(smp["idx"]):
            xs.setdefault(int(j), []).append(np.column_stack([np.ones(feats.shape[1]), feats[:, :, jj].T]))
            ys.setdefault(int(j), []).append(smp["d"][:, jj])
    out = {}
    for j, x in xs.items():
        a, y = np.concatenate(x), np.concatenate(ys[j])
        coef = np.linalg.lstsq(a, y, rcond=None)[0]
        res = y - a @ coef
        c0 = max(float(np.mean(res ** 2 - (a[:, 1:] * coef[1:] ** 2).sum(1))), 1e-8)
        out[j] = (coef, c0, float(np.clip(np.mean(res[1:] * res[:-1]), -0.49 * c0, 0.49 * c0)))
    return out


def filter_decode(test: list[dict], truth: SessionTruth, par: dict, shift: float, feedback: int,
                  context: tuple[float, float] = (0.2, 0.55)) -> dict[str, tuple[float, int]]:
    """{task: (accuracy, presentations)} of the matched filter over each presentation's innovations from
    ``context[0]`` s before its shifted span to ``context[1]`` s after (about the model's 1-s window), the
    neighbours at their prior mean and then, for ``feedback`` passes, at their posterior-mean rates."""
    hits: dict[str, list] = {}
    for smp in test:
        idx, pres = smp["idx"], smp["pres"]
        coef = np.array([par[int(j)][0] for j in idx])
        c0, c1 = (np.array([par[int(j)][i] for j in idx]) for i in (1, 2))
        off, amp = coef[:, 0], coef[:, 1:]
        rates = {t: class_rates(smp["units"], truth.model, t) for t in {p[0] for p in pres}}
        rbar = {t: r.mean(1) for t, r in rates.items()}
        ov = _overlaps(smp, shift)
        expected = np.array([smp["units"].baseline if y < 0 else rbar[t] for t, _, _, y in pres])
        todo = [i for i, p in enumerate(pres) if p[3] >= 0 and ov[i].sum() > 0]
        ll: dict[int, np.ndarray] = {}
        for _ in range(feedback + 1):
            feats = _taps(_expected(smp, ov, expected))
            mu = off[None] + np.einsum("tkj,jt->kj", feats, amp)
            var = c0[None] + np.einsum("tkj,jt->kj", feats, amp ** 2)
            nxt = expected.copy()
            for i in todo:
                task, a, b, _ = pres[i]
                ks = np.flatnonzero((smp["t1"] > a + shift - context[0]) & (smp["t0"] < b + shift + context[1]))
                h = np.einsum("tkj,jt->jk", _taps(np.outer(ov[i], np.ones(len(idx))))[:, ks], amp)
                resid = (smp["d"][ks] - mu[ks]).T + h * (expected[i] - rbar[task])[:, None]
                n = len(ks)
                cov = np.zeros((len(idx), n, n))
                cov[:, np.arange(n), np.arange(n)] = var[ks].T
                cov[:, np.arange(1, n), np.arange(n - 1)] = cov[:, np.arange(n - 1), np.arange(1, n)] = c1[:, None]
                sol = np.linalg.solve(cov, np.stack([resid, h], -1))
                dr = rates[task] - rbar[task][:, None]
                ll[i] = (h * sol[..., 0]).sum(1) @ dr - 0.5 * (h * sol[..., 1]).sum(1) @ dr ** 2
                post = np.exp(ll[i] - ll[i].max())
                nxt[i] = rates[task] @ (post / post.sum())
            expected = nxt
        for i in todo:
            task, a, b, y = pres[i]
            if smp["span"][0] <= (a + b) / 2 < smp["span"][1]:
                hits.setdefault(task, []).append(ll[i].argmax() == y)
    return {t: (float(np.mean(h)), len(h)) for t, h in hits.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--truth", required=True, help="the folder of the NWB files and their truth files")
    p.add_argument("--sessions", required=True, help="comma separated OPhys session ids")
    p.add_argument("--shifts", default="0.05,0.07,0.1,0.13", help="span shifts (s) after onset and offset")
    p.add_argument("--frames-per-token", type=int, default=3)
    p.add_argument("--before", action="store_true",
                   help="also the form conditioned on the innovation before the span (likelihood_ophys_before)")
    p.add_argument("--filter", action="store_true",
                   help="also the matched filter with and without decision feedback (likelihood_ophys_form=filter)")
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
    names = [*forms, *(["ceiling_filter", "ceiling_filter_nofeedback"] if a.filter else [])]
    result: dict = {**{f: {} for f in names}, "ideal_lower": ideal, "n": {}, "shifts": shifts,
                    "frames_per_token": a.frames_per_token}
    print(f"{'session':24s} {'shift':>6s} {'task':20s} {'ceiling':>8s} "
          + ("{:>8s} ".format("before") if a.before else "") + ("{:>8s} {:>8s} ".format("filter", "no-fb")
                                                                  if a.filter else "") + f"{'ideal':>7s} {'ratio':>6s} {'n':>5s}")
    for session in sessions:
        truth = SessionTruth.load(Path(a.truth) / session)
        fs = ({split: list(filter_samples(store, chunks, truth, session, split, a.frames_per_token))
               for split in ("train", "test")} if a.filter else {})
        for shift in shifts:
            args = (store, chunks, truth, session)
            test, train = (spans(*args, split, shift, a.frames_per_token) for split in ("test", "train"))
            accs = {f: decode(test, fit(train, before)) for f, before in forms.items()}
            if a.filter:
                par = filter_fit(fs["train"], truth, shift)
                accs["ceiling_filter"] = filter_decode(fs["test"], truth, par, shift, 2)
                accs["ceiling_filter_nofeedback"] = filter_decode(fs["test"], truth, par, shift, 0)
            for task, (v, n) in sorted(accs["ceiling"].items()):
                for f, acc in accs.items():
                    if task in acc:
                        result[f].setdefault(session, {}).setdefault(str(shift), {})[task] = acc[task][0]
                result["n"].setdefault(session, {})[task] = n
                lower = ideal.get(session, {}).get(task, float("nan"))
                extra = f"{accs['ceiling_before'][task][0]:8.3f} " if a.before else ""
                if a.filter:
                    extra += "".join(f"{accs[f].get(task, (math.nan,))[0]:8.3f} "
                                     for f in ("ceiling_filter", "ceiling_filter_nofeedback"))
                print(f"{session:24s} {shift:6.2f} {task:20s} {v:8.3f} {extra}{lower:7.3f} {v / lower:6.2f} {n:5d}")
    Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
