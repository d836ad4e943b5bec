"""The OPhys ideal-observer bounds (see :mod:`ingest.synth.ideal` for what they bound and why they are valid).

Lower: a Gaussian matched-filter decoder of the chunk's dF/F that knows the truth, with decision
feedback for the neighbours. Upper: exact Poisson Bayes on the regenerated latent spike counts.
Everything here works on one chunk (sample) of one session, mapped onto the session's frames.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ingest.synth.corpus import frame_bins, frame_means, ophys_latent
from ingest.synth.generative import SessionTruth, UnitParams, calcium_kernel, class_rates
from ingest.synth.schedule import OFF_S, ON_S, TASK_NAMES

#: Frames after a presentation's offset that the lower decoder reads (GCaMP decays over ~0.5 s).
TAIL_S = 1.0


def subset_units(units: UnitParams, idx: np.ndarray) -> UnitParams:
    return UnitParams(**{k: np.asarray(v)[idx] for k, v in vars(units).items()})


def _overlaps(edges: np.ndarray, a: float, b: float) -> np.ndarray:
    """Seconds of [a, b) inside each bin [edges[i], edges[i+1])."""
    return np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0.0, None)


def _prior(truth: SessionTruth, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(rbar, var) per ROI: mean and variance of a presentation's rate over the task's class mix in the schedule
    (blank sweeps, label -1, at the baseline)."""
    s = truth.schedule
    lab = s.label[s.mask(task)]
    rates = np.concatenate([class_rates(truth.units, truth.model, task), truth.units.baseline[:, None]], axis=1)
    w = np.bincount(np.where(lab < 0, rates.shape[1] - 1, lab), minlength=rates.shape[1]) / max(len(lab), 1)
    rbar = rates @ w
    return rbar, ((rates - rbar[:, None]) ** 2) @ w


def _whitener(sigma: np.ndarray, kmat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L^-1, L^-1 K) with Sigma = L L^T. L is lower triangular, so for the first n frames alone the
    factors are the leading blocks: a window cut short by the chunk's end needs no new solve."""
    linv = np.linalg.inv(np.linalg.cholesky(sigma))
    return linv, linv @ kmat


@dataclass
class _TaskFilter:
    """The Gaussian decoder's geometry for one task of one OPhys session (frames relative to onset)."""

    n_own: int  # count frames a presentation's window can touch
    n_read: int  # dF/F frames read from onset
    kmat: np.ndarray  # (rois, n_read, n_own): dF/F per unit count in an own-window frame, before amplitude
    sigma: np.ndarray  # (rois, n_read, n_read) dF/F covariance around the class mean
    rbar: np.ndarray  # (rois,)
    forward: tuple[np.ndarray, np.ndarray]  # _whitener of the frames in order (prefixes)
    backward: tuple[np.ndarray, np.ndarray]  # ... in reverse order (suffixes: windows cut at the chunk's start)
    cache: dict  # other frame subsets -> (Sigma^-1 K, K^T Sigma^-1 K)


class OphysSession:
    """What decoding an OPhys session needs, computed once: kernels, latent counts, prior-mean dF/F."""

    def __init__(self, truth: SessionTruth):
        c = truth.config
        self.truth = truth
        self.rate_hz = c.frame_rate_hz
        self.bins = frame_bins(truth.frame_times, c.frame_rate_hz)
        self.amp = truth.ophys["amplitude"]
        self.noise = truth.ophys["noise"]
        dt = 1.0 / c.frame_rate_hz
        self.kernels = [calcium_kernel(dt, c.tau_rise_s, td) for td in truth.ophys["tau_decay_s"]]
        self.mu, self.counts = ophys_latent(truth)
        s = truth.schedule
        prior_rates = np.repeat(truth.units.baseline[:, None], len(s.start), axis=1)
        self.prior = {t: _prior(truth, t) for t in TASK_NAMES}
        for t in TASK_NAMES:
            prior_rates[:, s.mask(t)] = self.prior[t][0][:, None]
        b = frame_means(truth.units, prior_rates, s, truth.frame_times, c.frame_rate_hz)
        n = len(truth.frame_times)
        self.mean_dff = np.stack([a * np.convolve(b[:, j], k)[:n] for j, (a, k) in
                                  enumerate(zip(self.amp, self.kernels))], axis=1)
        self.filters: dict[str, _TaskFilter] = {}

    def task_filter(self, task: str) -> _TaskFilter:
        """The decoder's kernel matrix and covariance for ``task``, for a canonical onset mid-frame.

        Counts per frame around a presentation: mean = baseline, or the prior-mean rate where any
        presentation is on; variance = that mean (Poisson) plus, for each neighbouring presentation
        of unknown class, the rate variance times its overlap outer product. Through the kernel
        and amplitude, plus the noise, this is the dF/F covariance around the class mean.
        """
        if task in self.filters:
            return self.filters[task]
        dt = 1.0 / self.rate_hz
        on, cycle = ON_S[task], ON_S[task] + OFF_S[task]
        n_own = int(np.ceil(on / dt)) + 2
        n_read = int(np.ceil((on + TAIL_S) / dt)) + 1
        lk = max(len(k) for k in self.kernels) - 1
        rel = np.arange(-lk, n_read)  # count frames relative to the onset frame
        edges = np.concatenate([rel, [n_read]]) * dt
        tau0 = 0.5 * dt
        m = int(np.ceil((lk + n_read) * dt / cycle)) + 1
        over = {k: _overlaps(edges, tau0 + k * cycle, tau0 + k * cycle + on) for k in range(-m, m + 1)}
        on_time = np.sum(list(over.values()), axis=0)  # seconds of presentation per count frame
        neigh = sum(np.outer(o, o) for k, o in over.items() if k != 0)
        lag = np.arange(n_read)[:, None] - rel[None, :]  # (dF/F frame, count frame)
        kf = np.stack([np.where((lag >= 0) & (lag < len(k)), k[np.clip(lag, 0, len(k) - 1)], 0.0)
                       for k in self.kernels])  # (rois, n_read, count frames)
        base = self.truth.units.baseline
        rbar, var = self.prior[task]
        poisson = (base[:, None, None] * dt * np.einsum("rfl,rgl->rfg", kf, kf)
                   + (rbar - base)[:, None, None] * np.einsum("rfl,l,rgl->rfg", kf, on_time, kf))
        mixture = var[:, None, None] * np.einsum("rfl,lm,rgm->rfg", kf, neigh, kf, optimize=True)
        sigma = (self.amp ** 2)[:, None, None] * (poisson + mixture) + (self.noise ** 2)[:, None, None] * np.eye(n_read)
        kmat = kf[:, :, lk:lk + n_own]
        self.filters[task] = _TaskFilter(n_own, n_read, kmat, sigma, rbar, _whitener(sigma, kmat),
                                         _whitener(sigma[:, ::-1, ::-1], kmat[:, ::-1]), {})
        return self.filters[task]

    def filter_terms(self, tf: _TaskFilter, avail: np.ndarray, idx: np.ndarray, o: np.ndarray,
                     resid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(o^T K^T Sigma^-1 resid, o^T K^T Sigma^-1 K o) per (presentation, ROI), over the available frames.

        o: (P, n_own); resid: (P, A, J) dF/F minus its mean at the available frames, in frame order.
        """
        n = int(avail.sum())
        first = int(np.argmax(avail))
        if avail[first:first + n].all():  # contiguous: a prefix or a suffix uses the triangular factors
            if first == 0:
                linv, wk = (a[idx] for a in tf.forward)
            elif first + n == len(avail):
                linv, wk = (a[idx] for a in tf.backward)
                resid = resid[:, ::-1]
            else:
                linv = None
            if linv is not None:
                z = np.einsum("jab,pbj->paj", linv[:, :n, :n], resid, optimize=True)
                v = np.einsum("jao,po->paj", wk[:, :n], o, optimize=True)
                return np.einsum("paj,paj->pj", v, z), np.einsum("paj,paj->pj", v, v)
        key = avail.tobytes()
        if key not in tf.cache:
            km = tf.kmat[:, avail, :]
            g = np.linalg.solve(tf.sigma[:, avail][:, :, avail], km)  # (rois, A, n_own)
            tf.cache[key] = (g, np.einsum("rao,rap->rop", km, g))
        g, h = tf.cache[key]
        return (np.einsum("po,jao,paj->pj", o, g[idx], resid, optimize=True),
                np.einsum("po,jox,px->pj", o, h[idx], o, optimize=True))


@dataclass
class _Chunk:
    """One OPhys sample mapped onto the session's frames and ROIs."""

    key: str
    idx: np.ndarray  # truth ROI index per column of dff
    dff: np.ndarray  # (T, J) float64
    row: np.ndarray  # global frame -> row of dff, -1 if the frame is not in the chunk
    last: int  # last global frame of the chunk
    latency: float


@dataclass
class _Group:
    """The labelled presentations of one task overlapping one chunk, and their frames."""

    task: str
    start: np.ndarray
    end: np.ndarray
    label: np.ndarray
    scored: np.ndarray  # bool: midpoint inside the chunk (the others only inform their neighbours)
    f0: np.ndarray  # (P,) onset frame
    own: np.ndarray  # (P, n_own) global count frames of the response window
    o: np.ndarray  # (P, n_own) seconds of the window in each
    read: np.ndarray  # (P, n_read) global dF/F frames the decoder reads
    avail: np.ndarray  # (P, n_read) bool: in the chunk
    rates: np.ndarray  # (J, C)
    d: np.ndarray  # (J, C) rate minus the prior mean


def _chunk(sess: OphysSession, sample) -> _Chunk:
    truth = sess.truth
    index = {str(u): i for i, u in enumerate(truth.unit_ids)}
    idx = np.asarray([index[u] for u in sample.meta["units"]], dtype=np.int64)
    ft = np.asarray(sample.arrays["frame_times"])
    n_frames = len(truth.frame_times)
    g = np.searchsorted(truth.frame_times, ft)
    if len(g) == 0 or g.max() >= n_frames or not np.array_equal(truth.frame_times[g], ft):
        raise ValueError(f"{sample.key}: frame times are not the truth file's")
    row = np.full(n_frames + 1, -1, dtype=np.int64)
    row[g] = np.arange(len(g))
    lat = truth.units.latency_s[idx]
    if not np.all(lat == lat[0]):
        raise ValueError(f"{sample.key}: ROIs of one plane with different latencies")
    return _Chunk(sample.key, idx, np.asarray(sample.arrays["dff"], dtype=np.float64), row, int(g.max()),
                  float(lat[0]))


def _group(sess: OphysSession, ch: _Chunk, task: str, start: np.ndarray, end: np.ndarray, label: np.ndarray,
           scored: np.ndarray) -> _Group:
    tf = sess.task_filter(task)
    n_frames = len(sess.truth.frame_times)
    w0, w1 = start + ch.latency, end + ch.latency
    f0 = np.maximum(np.searchsorted(sess.bins, w0, side="right") - 1, 0)
    own = np.minimum(f0[:, None] + np.arange(tf.n_own)[None, :], n_frames - 1)
    o = np.clip(np.minimum(sess.bins[own + 1], w1[:, None]) - np.maximum(sess.bins[own], w0[:, None]), 0.0, None)
    o[f0[:, None] + np.arange(tf.n_own)[None, :] >= n_frames] = 0.0
    read = f0[:, None] + np.arange(tf.n_read)[None, :]
    avail = ch.row[np.minimum(read, n_frames)] >= 0
    rates = class_rates(subset_units(sess.truth.units, ch.idx), sess.truth.model, task)
    return _Group(task, start, end, label, scored, f0, own, o, read, avail, rates, rates - tf.rbar[ch.idx, None])


def _upper(sess: OphysSession, ch: _Chunk, gr: _Group) -> np.ndarray:
    """(scored P, C) exact Poisson log-likelihood of the latent counts in the response window, up to the chunk's end,
    the neighbours' true classes given."""
    sc = gr.scored
    own, o, lab = gr.own[sc], gr.o[sc], gr.label[sc]
    use = (o > 0) & (own <= ch.last)
    o = np.where(use, o, 0.0)
    n = sess.counts[own][:, :, ch.idx] * use[:, :, None]  # (P, K, J)
    # sum over frames and ROIs of n log(lam) - lam with lam = other + o r_c; lam's class part sums to (sum o)(sum r_c)
    p, k, j = np.nonzero(n)
    other = np.clip(sess.mu[own[p, k], ch.idx[j]] - o[p, k] * gr.rates[j, lab[p]], 0.0, None)
    terms = n[p, k, j, None] * np.log(other[:, None] + o[p, k, None] * gr.rates[j])  # (nonzero, C)
    out = np.zeros((len(lab), gr.rates.shape[1]))
    np.add.at(out, p, terms)
    return out - o.sum(axis=1)[:, None] * gr.rates.sum(axis=0)[None, :]


def _lower(sess: OphysSession, ch: _Chunk, gr: _Group, excess: tuple | None) -> np.ndarray:
    """(P, C) Gaussian log-likelihood of the dF/F the decoder reads (the matched filter of the module doc).

    ``excess``: (first frame, (frames, J) dF/F the neighbours add beyond their prior mean, this group's own
    per-presentation rate excess (P, J)); the presentation's own share is added back before filtering.
    """
    tf = sess.task_filter(gr.task)
    amp = sess.amp[ch.idx]
    low = np.zeros((len(gr.start), gr.rates.shape[1]))
    groups: dict[bytes, list[int]] = defaultdict(list)
    for i, m in enumerate(gr.avail):
        if m.any():
            groups[m.tobytes()].append(i)
    for ps in groups.values():
        ps = np.asarray(ps)
        m = gr.avail[ps[0]]
        frames = gr.read[ps][:, m]  # (P, A)
        resid = ch.dff[ch.row[frames]] - sess.mean_dff[frames][:, :, ch.idx]  # (P, A, J)
        o = gr.o[ps]
        if excess is not None:
            first, extra, own_delta = excess
            kmat = tf.kmat[ch.idx][:, m, :]  # (J, A, n_own)
            own = (amp * own_delta[ps])[:, None, :] * np.einsum("jao,po->paj", kmat, o)
            resid = resid - extra[frames - first] + own
        s_j, q_j = sess.filter_terms(tf, m, ch.idx, o, resid)
        s_j, q_j = amp * s_j, amp ** 2 * q_j
        low[ps] = s_j @ gr.d - 0.5 * q_j @ gr.d ** 2
    return low


def _excess(sess: OphysSession, ch: _Chunk, groups: list[_Group], lows: list[np.ndarray]) -> tuple:
    """The dF/F every decoded presentation adds beyond its prior mean, at its posterior-mean rate."""
    first = min(int(gr.f0.min()) for gr in groups)
    counts = np.zeros((ch.last + 1 - first, len(ch.idx)))
    deltas = []
    for gr, low in zip(groups, lows):
        post = np.exp(low - low.max(axis=1, keepdims=True))
        post /= post.sum(axis=1, keepdims=True)
        delta = post @ gr.d.T  # (P, J) posterior-mean rate minus the prior mean
        keep = (gr.o > 0) & (gr.own <= ch.last)
        p, k = np.nonzero(keep)
        np.add.at(counts, gr.own[p, k] - first, gr.o[p, k, None] * delta[p])
        deltas.append(delta)
    n = len(counts)
    extra = np.stack([sess.amp[j] * np.convolve(counts[:, i], sess.kernels[j])[:n] for i, j in enumerate(ch.idx)],
                     axis=1)
    return [(first, extra, dl) for dl in deltas]


#: Decision-feedback passes of the OPhys lower decoder: re-decode with the neighbours' contribution at their
#: posterior-mean rate instead of the prior mean (back-to-back 0.25-s presentations overlap in the calcium).
FEEDBACK_PASSES = 2


def ophys_sample(sess: OphysSession, sample, queries: dict[str, tuple]) -> list[tuple]:
    """(task, start, label, lower loglik, upper loglik) per task, rows = the scored presentations.

    ``queries``: task -> (start, end, label, scored) of every labelled presentation overlapping the
    chunk; the unscored ones (midpoint outside) only inform their neighbours' decoding.
    """
    ch = _chunk(sess, sample)
    groups = [_group(sess, ch, t, *q) for t, q in queries.items()]
    if not groups:
        return []
    excess: list = [None] * len(groups)
    for k in range(FEEDBACK_PASSES + 1):
        lows = [_lower(sess, ch, gr, ex) for gr, ex in zip(groups, excess)]
        if k < FEEDBACK_PASSES:
            excess = _excess(sess, ch, groups, lows)
    return [(gr.task, gr.start[gr.scored], gr.label[gr.scored], low[gr.scored], _upper(sess, ch, gr))
            for gr, low in zip(groups, lows) if gr.scored.any()]
