"""The likelihood readout (``ModelConfig.likelihood_readout``): each classification query's logits gain the
log-likelihood of its units' responses under every class, from an encoding model the units' rows parametrise.

Why: the decoder's path to a class runs through cross-attention into latents, a trunk, and a query, and it learns a
new session's units only through the gradient of a softmax over classes; on the benchmark corpus that path ends
level with a per-session naive Bayes, far below a decoder that knows the corpus's shared code (docs/model.md
sections 11-17). Neuroscience's own decoder is the inverse of an encoding model: a rate per unit and class,
and the class whose rates best explain the counts (a Poisson GLM). Here that model is *shared*: one learned code per
(task, class), the same for both modalities (they see the same stimuli), and each unit's tuning read from its row,

    rate[u, c] = softplus(b_u) + softplus(g_u) * softplus(k_u[task] v_u . code[task][c])      (b, g, k, v) = A_m(LN(row_u))

with ``A_m`` one linear map per modality (``task_gains="inside"``, ModelConfig's default: a per-task sharpness
``k`` inside the tuning curve, as the generator's region task gains; ``"unit"``, the earlier form, puts a gain per
(unit, task) outside it instead, ``softplus(g_u[task]) * softplus(v_u . code)``; docs/model.md section 21). A new
session's units only need rows that this map reads right, so a pretrained code carries over as the shared part of
the corpus does. The query's logits then gain

    EPhys:  sum_u  n_u log rate[u, c] - T rate[u, c]                  (Poisson counts n_u in the span of length T)
    OPhys:  sum_u  log N(S_u; o_u k_u + A_u T rate[u, c],  s_u^2 k_u + A_u^2 T rate[u, c])    (ophys_form="sum")

(ModelConfig's OPhys default is ``ophys_form="filter"`` instead: a matched filter over every innovation of the
window with decision feedback for the neighbouring presentations, :mod:`trainer.model.calcium_filter`, which
reaches the ideal observer's lower bound with the true rates where this sum stops at 0.82-0.92 of it)

(class-independent terms dropped), over every unit of the query's window (``sample_unit_index``: those unit
dropout kept, silent ones included: a unit that does not fire is evidence against the classes that drive it, and
leaving it out biases a 1-s drifting grating's counts upwards). The same encoding model
is also fit to the responses it explains (``likelihood_fit``): the negative log-likelihood of each unit's response
under the query's true class, the generative fit the new-session observer makes (docs/model.md section 11). The
cross-entropy alone reaches a class's code only through that class's share of the posterior, and a code that
starts uninformative can stay so (measured: drifting gratings decoded below chance by the readout alone). The span is the part of
the presentation inside the window (``output_span``), shifted by the modality's response latency and clipped to the
window. The sum is added to the decoder's logits (a product of experts, trained end to end by the same
cross-entropy), so the model can lean on either.

OPhys reads each ROI's calcium *innovations*, not its dF/F: d_k = x_k - exp(-dt_k / tau_u) x_(k-1), each token
minus the decay of the ROI's previous token (``calcium_innovations``). Back-to-back 0.25-s presentations overlap in
the calcium (GCaMP decays over 0.4-0.7 s), so a presentation's mean dF/F is mostly its predecessors' response, and a
Gaussian on it cost OPhys natural scenes 0.15 (docs/model.md section 18; the innovations: section 19). The decay
removed, what is left in the span is the response to the span's own spikes: their sum S_u over the span's k_u
innovations is, given the class, a Poisson number of spikes (mean T rate) times a per-spike amplitude A_u plus
noise, whose mean and variance the Gaussian above matches (the compound-Poisson form of the benchmark's ideal
observer; ``A``, ``tau``, the offset ``o`` and the noise ``s`` are read from the ROI's row like ``b, g, v``). A
ROI's first token of the window has no predecessor and is left out.

``before`` (``ModelConfig.likelihood_ophys_before``): a token's innovation carries its own noise minus ``a`` times the
previous token's (``d_k = A n_k + e_k - a e_(k-1)``, ``a = exp(-dt / tau)``), so the span's sum S shares the noise
of the token before the span with that token's innovation ``d_b``, whose content (the previous presentation's
spikes) does not depend on this presentation's class. Conditioning on it is free information: S's mean gains
``beta_u d_b`` (``beta`` read from the ROI's row, 0 at first; ``d_b`` the mean innovation in the ``BEFORE_S``
before the span, 0 where there is none). With the generator's true rates this lifts the form's ceiling on static
gratings and natural scenes by 0.01-0.03 (bench/readout_ceiling.py ``--before``, docs/model.md section 21). The
token after the span would halve the noise again, but it holds the end of the span's own calcium rise, so its
content depends on the class (the same probe: drifting gratings lower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shards.schema import MODALITY_INDEX
from trainer.model import calcium_filter as cf
from trainer.model.counts import query_unit_counts
from trainer.model.packing import segment_ids

#: spans shorter than this (seconds) after clipping to the window get no likelihood term
MIN_SPAN_S = 0.05
#: ``before``: the stretch before an OPhys span whose innovations condition its sum (one 3-frame token at 30 Hz)
BEFORE_S = 0.1


class LikelihoodHead(nn.Module):
    """Per-modality maps from a unit's row to its encoding parameters, and the shared class codes.
    ``tasks``: the model's tasks in order as (name, classes or None for a regression)."""

    def __init__(self, *, dim: int, rank: int, tasks: list[tuple[str, int | None]],
                 task_gains: str = "unit", before: bool = False, ophys_form: str = "sum",
                 feedback: int = 2, fit_norm: str = "group") -> None:
        super().__init__()
        self.rank = rank
        self.tasks = [name if n is not None else None for name, n in tasks]
        self.n_tasks = len(tasks)
        # the map reads each row's direction: rows start at 0.02 scale and the encoder reads them too
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        # one form per modality: "X" for both, or "X/Y" for EPhys / OPhys (ModelConfig.likelihood_task_gains)
        forms = task_gains.split("/") if "/" in task_gains else [task_gains] * len(MODALITY_INDEX)
        self.inside = [f == "inside" for f in forms]
        # b, s, g (or sharpness) per task, [one gain,] v
        self.unit_map = nn.ModuleList(nn.Linear(dim, 2 + self.n_tasks + int(self.inside[i]) + rank)
                                      for i in MODALITY_INDEX.values())
        with torch.no_grad():
            for m, i in MODALITY_INDEX.items():
                lin = self.unit_map[i]
                lin.weight.mul_(0.5)
                lin.bias.zero_()
                # EPhys: a ~3 Hz baseline; OPhys: dF/F near 0, noise sd ~0.1; task gains ~0.02, so every class
                # starts alike (the readout adds ~nothing to the decoder until it has learnt something)
                lin.bias[0] = 3.0 if m == "ephys" else 0.0
                lin.bias[1] = -2.2
                lin.bias[2:2 + self.n_tasks] = -4.0
                if self.inside[i]:  # sharpness softplus(0.5413) = 1 per task; the one outer gain starts like the others
                    lin.bias[2:2 + self.n_tasks] = 0.5413
                    lin.bias[2 + self.n_tasks] = -4.0
        # OPhys: per-spike amplitude A (dF/F summed over the innovations; ~0.1), decay tau (s; ~0.5) and the
        # innovations' offset o per token (0), from the ROI's row like the rest
        # ``before``: a fourth number per ROI, the weight beta of the innovation just before the span (0 at first)
        self.before = before
        self.calcium_map = nn.Linear(dim, 4 if before else 3)
        with torch.no_grad():
            self.calcium_map.weight.mul_(0.1)
            self.calcium_map.bias.copy_(torch.tensor([-2.25, -0.43, 0.0, 0.0][:self.calcium_map.out_features]))
            if before:
                self.calcium_map.weight[3].zero_()
        # ``ophys_form="filter"`` (trainer.model.calcium_filter): per ROI the noise's lag-1 correlation and the taps
        # A[-1], A[1], A[2] beside the amplitude A[0] above (started at the generator's rise: ~half a spike's
        # calcium shows in the next token's innovation)
        self.ophys_form, self.feedback, self.fit_norm = ophys_form, feedback, fit_norm
        self.filter_map = nn.Linear(dim, 4) if ophys_form == "filter" else None
        if self.filter_map is not None:
            with torch.no_grad():
                self.filter_map.weight.mul_(0.1)
                self.filter_map.bias.copy_(torch.tensor([-0.5, 0.0, 0.05, 0.0]))
        self.codes = nn.ParameterDict({name: nn.Parameter(torch.randn(n, rank) * rank ** -0.5)
                                       for name, n in tasks if n is not None})
        # a learned log-temperature per (modality, task): a misspecified encoding model is over-confident in
        # proportion to the evidence (hundreds of units over a 1-s drifting grating), and the cross-entropy can
        # only calibrate it through this
        self.log_scale = nn.Parameter(torch.zeros(len(MODALITY_INDEX), self.n_tasks))
        # shared task gains: a unit's gain on task k is softplus(its one gain + an offset per (modality, task)), so
        # how strongly a task drives a unit relative to another is the corpus's, not fit per unit from a few
        # presentations (the generator's task gains are per region; a finetuning's per-unit drifting-grating gains
        # fit noise: its tuning came out 1.5 times too deep, docs/model.md section 20)
        self.task_gain_offset = (nn.Parameter(torch.zeros(len(MODALITY_INDEX), self.n_tasks))
                                 if "shared" in forms else None)
        self.shared = [f == "shared" for f in forms]

    def params(self, rows: Tensor, modality: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """rows (R, D) of one modality -> b (R,), noise sd s (R,), task gains g (R, n_tasks), v (R, rank), and the
        drive's sharpness per task k (R, n_tasks): ones but with ``task_gains="inside"``, where g is one gain per
        unit and k scales ``v . code`` inside the softplus instead (the generator's form, ingest.synth.generative:
        a region's task gain sharpens the tuning, so one v can serve every task from one shared code subspace)."""
        h = self.unit_map[modality](self.norm(rows))
        n = self.n_tasks
        if self.inside[modality]:
            return (h[:, 0], F.softplus(h[:, 1]) + 1e-3, F.softplus(h[:, 2 + n:3 + n]).expand(-1, n),
                    h[:, 3 + n:], F.softplus(h[:, 2:2 + n]))
        gains = (h[:, 2:3] + self.task_gain_offset[modality] if self.task_gain_offset is not None and
                 self.shared[modality] else h[:, 2:2 + n])
        return h[:, 0], F.softplus(h[:, 1]) + 1e-3, F.softplus(gains), h[:, 2 + n:], torch.ones_like(gains)

    def calcium(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """rows (R, D) of OPhys ROIs -> per-spike amplitude A (R,), decay time constant tau in s (R,), offset o (R,),
        and the weight beta (R,) of the innovation before the span (zeros without ``before``)."""
        h = self.calcium_map(self.norm(rows))
        beta = h[:, 3] if self.before else torch.zeros_like(h[:, 2])
        return F.softplus(h[:, 0]) + 1e-3, F.softplus(h[:, 1]) + 0.02, h[:, 2], beta

    def filter_params(self, rows: Tensor, amp0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """rows (R, D) of OPhys ROIs -> the noise's lag-1 correlation rho (R,), |rho| < 0.49, and the taps (R,
        len(TAPS)) in ``calcium_filter.TAPS`` order (-1, 0, 1, 2), A[0] the amplitude of :meth:`calcium` (``amp0``:
        that amplitude where the caller has it already)."""
        assert self.filter_map is not None
        h = self.filter_map(self.norm(rows))
        if amp0 is None:
            amp0 = self.calcium(rows)[0]
        return 0.49 * torch.tanh(h[:, 0]), torch.stack([h[:, 1], amp0, h[:, 2], h[:, 3]], 1)

    def rates(self, b: Tensor, g: Tensor, v: Tensor, k: Tensor, task: int) -> Tensor:
        """(R, classes) firing rate (Hz) of each row's unit during each class of ``task`` (``k``: sharpness)."""
        drive = F.softplus(k[:, task, None] * (v @ self.codes[self.tasks[task]].T))  # type: ignore[index]
        return F.softplus(b)[:, None] + g[:, task, None] * drive


def calcium_innovations(unit: Tensor, time: Tensor, sample: Tensor, values: Tensor, tau: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """Per token: its value minus the decay of the previous token of the same (sample, unit), ``x_k - exp(-(t_k -
    t_j) / tau_k) x_j``, and whether it has such a predecessor. ``sample`` (N,): each token's sample; ``tau`` (N,):
    each token's unit's decay (s). Works on any token order (one stable sort by time, then by sample and unit)."""
    n = unit.numel()
    if n == 0:
        return values.new_zeros(0), torch.zeros(0, dtype=torch.bool, device=unit.device)
    key = sample * (int(unit.max()) + 1) + unit
    by_time = torch.sort(time, stable=True).indices
    order = by_time[torch.sort(key[by_time], stable=True).indices]
    k, t, x, tk = key[order], time[order], values[order], tau[order]
    has = torch.zeros(n, dtype=torch.bool, device=unit.device)
    has[1:] = k[1:] == k[:-1]
    prev = torch.cat([x[:1], x[:-1]])
    dt = torch.cat([t[:1], t[1:] - t[:-1]])
    d = torch.where(has, x - torch.exp(-dt / tk) * prev, torch.zeros_like(x))
    back = torch.empty_like(order)
    back[order] = torch.arange(n, device=order.device)
    return d[back], has[back]


def likelihood_logits(head: LikelihoodHead, unit_rows, batch: dict[str, Tensor], q_sample: Tensor, *,
                      latency: tuple[float, float], window_s: float, ophys: bool = True
                      ) -> tuple[dict[int, tuple[Tensor, Tensor]], Tensor | None]:
    """Per task index: (query rows, their (Q_k, classes) log-likelihoods) for the batch's classification queries
    whose span has at least ``MIN_SPAN_S`` inside the window; and the mean negative log-likelihood per (query,
    unit) of the labelled ones under their own class (None without any). ``latency``: (EPhys, OPhys) response
    latency in s; ``unit_rows(index)`` gives the D-wide rows of global unit indices; ``ophys`` False leaves OPhys
    queries to the decoder alone."""
    if "output_span" not in batch:
        raise ValueError("the likelihood readout needs the batch key 'output_span' (docs/batch.md); this batch has none")
    t = batch["output_timestamps"].float()
    half = batch["output_span"].float() / 2
    modality = batch["modality"][q_sample]
    # OPhys tokens are stamped calcium_lag_s before their frames (docs/batch.md): the response is that much earlier
    lat_ophys = latency[1] - float(batch.get("calcium_lag_s", 0.0))
    lat = torch.where(modality == MODALITY_INDEX["ephys"], latency[0], lat_ophys).to(t.dtype)
    lo = (t - half + lat).clamp(0.0, window_s)
    hi = (t + half + lat).clamp(0.0, window_s)
    task = batch["output_task_index"]
    scored = torch.tensor([name is not None for name in head.tasks], device=t.device)
    keep = scored[task] & (hi - lo >= MIN_SPAN_S)
    out: dict[int, tuple[Tensor, Tensor]] = {}
    if not bool(keep.any()):
        return out, None
    labels = batch["output_labels"]
    # every unit the window kept, silent ones included (batches without the list: the units with a token)
    members = ((batch["sample_unit_index"], batch["sample_unit_cu_seqlens"]) if "sample_unit_index" in batch
               else None)
    unit_in, t_in, cu_in = batch["input_unit_index"], batch["input_timestamps"].float(), batch["input_cu_seqlens"].long()
    sample_in = segment_ids(cu_in, unit_in.numel())
    fit_sum, fit_n = t.new_zeros(()), 0
    parts: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for m_name, m in MODALITY_INDEX.items():
        if m_name == "ophys" and not ophys:
            continue
        q = (keep & (modality == m)).nonzero().squeeze(1)
        if q.numel() == 0:
            continue
        ephys = m_name == "ephys"
        if not ephys and head.ophys_form == "filter":
            sel = (batch["modality"][sample_in] == m).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            terms, f_sum, f_n = ophys_filter_logits(
                head, unit_rows, unit_in[sel], t_in[sel], sample_in[sel], batch["input_values"][sel].float(),
                cu_in.numel() - 1, q_sample[q], lo[q], hi[q], task[q], labels[q], m)
            for k, (local, summed) in terms.items():
                parts.setdefault(k, []).append((q[local], summed))
            fit_sum, fit_n = fit_sum + f_sum, fit_n + f_n
            continue
        values = None
        if not ephys:  # OPhys: each token's calcium innovation, and whether it has one (EPhys needs counts only)
            sel = (batch["modality"][sample_in] == m).nonzero().squeeze(1)
            roi = torch.unique(unit_in[sel])
            if roi.numel() == 0:
                continue
            tau_roi = head.calcium(unit_rows(roi))[1]
            d, has = calcium_innovations(unit_in[sel], t_in[sel], sample_in[sel], batch["input_values"][sel].float(),
                                         tau_roi[torch.searchsorted(roi, unit_in[sel])])
            values = d.new_zeros(unit_in.numel(), 2)
            values[sel] = torch.stack([torch.where(has, d, torch.zeros_like(d)), has.to(d.dtype)], 1)
        row_q, row_unit, n_tok, v_sum = query_unit_counts(unit_in, t_in, cu_in, q_sample[q], lo[q], hi[q],
                                                          values=values, members=members, sample_of_token=sample_in)
        prior_d = None
        if v_sum is not None:  # OPhys: a ROI with no innovation in the span says nothing about it
            keep_row = v_sum[:, 1] > 0
            if head.before:  # the innovations in the token-long stretch before the span, rows as the span's
                pre = query_unit_counts(unit_in, t_in, cu_in, q_sample[q], (lo[q] - BEFORE_S).clamp(min=0.0), lo[q],
                                        values=values, members=members, sample_of_token=sample_in)[3]
                assert pre is not None
                prior_d = (pre[:, 0] / pre[:, 1].clamp(min=1.0))[keep_row]  # their mean; 0 where there is none
            row_q, row_unit, n_tok, v_sum = row_q[keep_row], row_unit[keep_row], n_tok[keep_row], v_sum[keep_row]
        if row_q.numel() == 0:
            continue
        present, unit_index = torch.unique(row_unit, return_inverse=True)  # each (query, unit)'s parameters
        rows = unit_rows(present)
        b, s, g, v, sharp = (x[unit_index] for x in head.params(rows, m))
        if not ephys:
            amp, _, off, beta = (x[unit_index] for x in head.calcium(rows))
        qt = task[q][row_q]
        for k in qt.unique().tolist():
            r = (qt == k).nonzero().squeeze(1)
            rate = head.rates(b[r], g[r], v[r], sharp[r], k)
            y = labels[q][row_q[r]]
            mine = y >= 0
            span = (hi - lo)[q][row_q[r]]
            if ephys:
                ll = n_tok[r, None] * torch.log(rate + 1e-6) - span[:, None] * rate
                own = rate[mine].gather(1, y[mine, None]).squeeze(1)
                fit = span[mine] * own - n_tok[r][mine] * torch.log(own + 1e-6)
            else:
                assert v_sum is not None
                n_in = v_sum[r, 1]
                spikes = rate * (span * n_in / n_tok[r])[:, None]  # expected spikes in the innovations' share
                mean = off[r, None] * n_in[:, None] + amp[r, None] * spikes
                if prior_d is not None:  # the span's sum given the innovation before it (module doc)
                    mean = mean + (beta[r] * prior_d[r])[:, None]
                var = s[r, None] ** 2 * n_in[:, None] + amp[r, None] ** 2 * spikes
                ll = -(v_sum[r, 0, None] - mean) ** 2 / (2 * var) - 0.5 * torch.log(var)
                fit = -ll[mine].gather(1, y[mine, None]).squeeze(1)
            fit_sum = fit_sum + fit.sum()
            fit_n += int(mine.sum())
            ll = ll * head.log_scale[m, k].exp()
            local = row_q[r]
            queries, which = torch.unique(local, return_inverse=True)
            summed = ll.new_zeros(len(queries), ll.shape[1]).index_add_(0, which, ll)
            parts.setdefault(k, []).append((q[queries], summed))
    for k, items in parts.items():
        out[k] = (torch.cat([i for i, _ in items]), torch.cat([x for _, x in items]))
    return out, (fit_sum / fit_n if fit_n else None)


def ophys_filter_logits(head: LikelihoodHead, unit_rows, unit: Tensor, time: Tensor, sample: Tensor, values: Tensor,
                        n_samples: int, q_sample: Tensor, lo: Tensor, hi: Tensor, task: Tensor, labels: Tensor,
                        modality: int) -> tuple[dict[int, tuple[Tensor, Tensor]], Tensor, int]:
    """The OPhys queries' log-likelihoods by the matched filter with decision feedback (``ophys_form="filter"``,
    :mod:`trainer.model.calcium_filter`): per task, (positions among the given queries, (Q_k, classes)), plus the
    generative fit's summed negative log-likelihood and its number of (sample, ROI) groups. Tokens: the OPhys
    samples' (``sample`` their sample of ``n_samples``); queries: their sample, span [lo, hi), task and label."""
    grid = cf.token_grid(unit, time, sample, values, n_samples)
    present, inv = torch.unique(grid.unit, return_inverse=True)
    rows = unit_rows(present)
    b, noise, gain, v, sharp = (x[inv] for x in head.params(rows, modality))
    amp0, tau, off, _ = head.calcium(rows)
    rho, amp = (x[inv] for x in head.filter_params(rows, amp0))
    tau, off = tau[inv], off[inv]
    d, valid, t_lo, t_hi = cf.innovations(grid, tau)
    # pairs: every (query, group of its sample)
    per_sample = torch.diff(grid.first)
    reps = per_sample[q_sample]
    start = F.pad(reps.cumsum(0), (1, 0))
    n_pairs = int(start[-1])
    pq = torch.repeat_interleave(torch.arange(len(q_sample), device=unit.device), reps, output_size=n_pairs)
    pg = grid.first[q_sample][pq] + torch.arange(n_pairs, device=unit.device) - start[pq]
    overlap = (torch.minimum(t_hi[pg], hi[pq, None]) - torch.maximum(t_lo[pg], lo[pq, None])).clamp(min=0.0)
    overlap = overlap * valid[pg]
    base = F.softplus(b)
    inp = cf.FilterInputs(d, valid, (t_hi - t_lo) * valid, amp, off, noise ** 2, rho, base, pg, overlap)
    tasks = {k: (task[pq] == k).nonzero().squeeze(1) for k in task[pq].unique().tolist()
             if head.tasks[k] is not None}
    rate = {k: head.rates(b[pg[r]], gain[pg[r]], v[pg[r]], sharp[pg[r]], k) for k, r in tasks.items()}
    rbar = base[pg]  # pairs of no scored task (none: the caller keeps scored queries) sit at the baseline
    for k, r in tasks.items():
        rbar = rbar.index_put((r,), rate[k].mean(1))
    expected = rbar
    out: dict[int, tuple[Tensor, Tensor]] = {}
    for step in range(head.feedback + 1):
        lam = cf.expected_counts(inp, expected - base[pg])
        z, qq = cf.filter_terms(inp, lam, expected - rbar)
        posterior_mean = expected
        for k, r in tasks.items():
            dr = rate[k] - rbar[r, None]
            ll = (dr * z[r, None] - 0.5 * dr ** 2 * qq[r, None]) * head.log_scale[modality, k].exp()
            local, which = torch.unique(pq[r], return_inverse=True)
            summed = ll.new_zeros(len(local), ll.shape[1]).index_add_(0, which, ll)
            out[k] = (local, summed)
            if step < head.feedback:  # the neighbours at their posterior-mean rate in the next pass
                post = torch.softmax(summed.detach(), dim=1)[which]
                posterior_mean = posterior_mean.index_put((r,), (post * rate[k]).sum(1))
        expected = posterior_mean
    # the generative fit: every labelled presentation at its true class, the others at their decoded mean
    truth = expected
    for k, r in tasks.items():
        y = labels[pq[r]]
        own = rate[k].gather(1, y.clamp(min=0)[:, None]).squeeze(1)
        truth = truth.index_put((r,), torch.where(y >= 0, own, expected[r]))
    nll = cf.gaussian_nll(inp, cf.expected_counts(inp, truth - base[pg]))
    if head.fit_norm == "token":  # one term per (sample, ROI), the scale of an EPhys (query, unit) term
        nll = nll / valid.sum(1).clamp(min=1)
    labelled = torch.zeros(len(nll), dtype=torch.bool, device=unit.device)
    labelled[pg[labels[pq] >= 0]] = True
    return out, nll[labelled].sum(), int(labelled.sum())
