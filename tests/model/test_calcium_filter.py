"""The likelihood readout's OPhys filter form (trainer.model.calcium_filter): its log-likelihoods and fit against
a loop over samples, ROIs and queries with dense matrices, and what the decision feedback does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.model.support import N_UNITS, batch_for, model_for, small
from trainer.model.calcium_filter import TAPS, token_grid
from trainer.model.likelihood import MIN_SPAN_S, LikelihoodHead, likelihood_logits
from trainer.model.packing import segment_ids

LATENCY = (0.05, 0.1)
TASKS = [("static_gratings", 6), ("drifting_gratings", 8), ("natural_scenes", 119)]


def loop(head: LikelihoodHead, rows: torch.Tensor, batch: dict) -> tuple[dict, float]:
    """{task: {query: (classes,) log-likelihood}} and the fit's mean negative log-likelihood per (sample, ROI),
    written out per OPhys sample in float64: each ROI's innovations, the intervals they cover, the span's overlap
    with each, the counts' mean through the taps, the covariance as a dense matrix, and the passes."""
    cu, cu_q = batch["input_cu_seqlens"].tolist(), batch["output_cu_seqlens"].tolist()
    out: dict[int, dict[int, np.ndarray]] = {}
    nlls = []
    for s in range(len(cu) - 1):
        if int(batch["modality"][s]) != 1:
            continue
        units = batch["input_unit_index"][cu[s]:cu[s + 1]]
        times = batch["input_timestamps"][cu[s]:cu[s + 1]].double()
        values = batch["input_values"][cu[s]:cu[s + 1]].double()
        queries = []
        for q in range(cu_q[s], cu_q[s + 1]):
            t, span = float(batch["output_timestamps"][q]), float(batch["output_span"][q])
            lo = min(max(t - span / 2 + LATENCY[1], 0.0), 1.0)
            hi = min(max(t + span / 2 + LATENCY[1], 0.0), 1.0)
            if hi - lo >= MIN_SPAN_S:
                queries.append((q, lo, hi, int(batch["output_task_index"][q]), int(batch["output_labels"][q])))
        if not queries:
            continue
        roi = []
        for u in sorted(set(units.tolist())):
            with torch.no_grad():
                b, sd, g, v, sharp = (x[0].double() for x in head.params(rows[u][None], 1))
                amp0, tau, off, _ = (x[0].double() for x in head.calcium(rows[u][None]))
                rho, amp = (x[0].double() for x in head.filter_params(rows[u][None]))
            idx = sorted((units == u).nonzero().squeeze(1).tolist(), key=lambda i: float(times[i]))
            x, t = values[idx].numpy(), times[idx].numpy()
            d = x[1:] - np.exp(-(t[1:] - t[:-1]) / float(tau)) * x[:-1]
            ov = np.array([[max(min(t[k + 1], hi) - max(t[k], lo), 0.0) for k in range(len(d))]
                           for _, lo, hi, _, _ in queries])  # (queries, K)
            rates = []
            for _, _, _, k, _ in queries:
                code = head.codes[head.tasks[k]].detach().double()
                rates.append((F.softplus(b) + g[k] * F.softplus(sharp[k] * (code @ v))).numpy())
            roi.append(dict(d=d, length=t[1:] - t[:-1], ov=ov, rates=rates, base=float(F.softplus(b)),
                            amp=amp.numpy(), off=float(off), c0=float(sd) ** 2, rho=float(rho)))

        def moments(r, excess):
            lam = r["base"] * r["length"] + excess @ r["ov"]
            kk = len(lam)
            through = np.zeros((kk, kk))  # innovation k reads interval k - tap
            for a, tap in zip(r["amp"], TAPS):
                for k in range(kk):
                    if 0 <= k - tap < kk:
                        through[k, k - tap] = a
            cov = np.diag(r["c0"] + (through ** 2) @ lam)
            for k in range(kk - 1):
                cov[k, k + 1] = cov[k + 1, k] = r["rho"] * r["c0"]
            return r["off"] + through @ lam, cov, through

        rbar = [[np.mean(rt) for rt in r["rates"]] for r in roi]
        expected = [list(x) for x in rbar]
        for step in range(head.feedback + 1):
            ll = {i: 0.0 for i in range(len(queries))}
            for j, r in enumerate(roi):
                mu, cov, through = moments(r, np.array(expected[j]) - r["base"])
                inv = np.linalg.inv(cov)
                for i in range(len(queries)):
                    h = through @ r["ov"][i]
                    resid = r["d"] - mu + h * (expected[j][i] - rbar[j][i])
                    dr = r["rates"][i] - rbar[j][i]
                    ll[i] = ll[i] + dr * (h @ inv @ resid) - 0.5 * dr ** 2 * (h @ inv @ h)
            scale = [float(head.log_scale[1, k].detach().exp()) for _, _, _, k, _ in queries]
            post = [np.exp(ll[i] * scale[i] - (ll[i] * scale[i]).max()) for i in range(len(queries))]
            if step < head.feedback:
                expected = [[float((post[i] / post[i].sum()) @ r["rates"][i]) for i in range(len(queries))]
                            for r in roi]
        for i, (q, _, _, k, _) in enumerate(queries):
            out.setdefault(k, {})[q] = ll[i] * scale[i]
        if any(y >= 0 for *_, y in queries):
            for j, r in enumerate(roi):
                truth = [r["rates"][i][y] if y >= 0 else expected[j][i] for i, (*_, y) in enumerate(queries)]
                mu, cov, _ = moments(r, np.array(truth) - r["base"])
                resid = r["d"] - mu
                nll = 0.5 * resid @ np.linalg.inv(cov) @ resid + 0.5 * np.linalg.slogdet(cov)[1]
                nlls.append(nll / len(resid) if head.fit_norm == "token" else nll)
    return out, float(np.mean(nlls))


def _head(seed: int, feedback: int) -> LikelihoodHead:
    torch.manual_seed(seed)
    head = LikelihoodHead(dim=16, rank=4, tasks=TASKS, task_gains="inside", ophys_form="filter", feedback=feedback)
    with torch.no_grad():  # sharpness and gains well away from their start, so every class differs
        for lin in head.unit_map:
            lin.bias[2:5] = torch.tensor([0.5, 1.0, 2.0])
            lin.bias[5] = 1.0
        head.filter_map.weight.uniform_(-0.3, 0.3)
        head.log_scale.uniform_(-1, 1)
    return head


@pytest.mark.parametrize(("seed", "feedback"), [(0, 0), (1, 2), (2, 1)])
def test_filter_log_likelihoods_equal_a_loop_with_dense_matrices(seed, feedback):
    head = _head(seed, feedback)
    rows = torch.randn(N_UNITS, 16)
    batch = batch_for(modalities=[1, 0, 1, 1], seed=seed, queries_per_sample=4)
    batch["output_span"] = torch.rand(len(batch["output_span"]), generator=torch.Generator().manual_seed(seed)) * 0.6
    q_sample = segment_ids(batch["output_cu_seqlens"].long())
    got, fit = likelihood_logits(head, lambda i: rows[i], batch, q_sample, latency=LATENCY, window_s=1.0)
    want, want_fit = loop(head, rows, batch)
    ophys = {k: {q: ll for q, ll in zip(*got[k]) if int(batch["modality"][q_sample[q]]) == 1} for k in got}
    assert sum(len(v) for v in want.values()) > 3
    for k, rows_k in want.items():
        assert sorted(int(q) for q in ophys[k]) == sorted(rows_k)
        for q, ll in ophys[k].items():
            np.testing.assert_allclose(ll.detach().double().numpy(), rows_k[int(q)], rtol=1e-3, atol=1e-3)
            assert float((ll.max() - ll.min()).detach()) > 1e-3  # the classes differ
    # the fit on OPhys alone (with EPhys, its terms per (query, unit) join the same mean)
    alone = batch_for(modalities=[1, 1, 1], seed=seed, queries_per_sample=4)
    for norm in ("group", "token"):  # per (sample, ROI): the innovations' summed or mean negative log-likelihood
        head.fit_norm = norm
        _, fit = likelihood_logits(head, lambda i: rows[i], alone, segment_ids(alone["output_cu_seqlens"].long()),
                                   latency=LATENCY, window_s=1.0)
        assert fit is not None and float(fit.detach()) == pytest.approx(loop(head, rows, alone)[1], rel=1e-3, abs=1e-3)


def test_the_grid_lays_each_sample_and_roi_out_in_time_order_from_any_token_order():
    unit = torch.tensor([5, 2, 5, 2, 5, 2, 5])
    time = torch.tensor([0.3, 0.1, 0.1, 0.3, 0.2, 0.2, 0.0])
    sample = torch.tensor([0, 0, 0, 0, 0, 0, 1])
    values = torch.arange(7.0)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    for order in (torch.arange(7), perm):
        g = token_grid(unit[order], time[order], sample[order], values[order], 2)
        assert g.sample.tolist() == [0, 0, 1] and g.unit.tolist() == [2, 5, 5]
        assert g.first.tolist() == [0, 2, 3]
        assert g.x[0].tolist() == [1.0, 5.0, 3.0] and g.x[1].tolist() == [2.0, 4.0, 0.0]
        assert g.valid.tolist() == [[True] * 3, [True] * 3, [True, False, False]]


def test_bad_filter_settings_are_refused_in_one_line():
    for kw, field in (({"likelihood_ophys_form": "kalman"}, "likelihood_ophys_form"),
                      ({"likelihood_ophys_feedback": -1}, "likelihood_ophys_feedback"),
                      ({"likelihood_ophys_fit_norm": "roi"}, "likelihood_ophys_fit_norm"),
                      ({"likelihood_ophys_form": "filter", "likelihood_ophys_before": True}, "likelihood_ophys_before")):
        with pytest.raises(ValueError, match=field) as err:
            small(likelihood_readout=True, **kw)
        assert "\n" not in str(err.value)


def test_the_filter_trains_its_taps_and_the_rows_of_every_roi():
    """In the model: the loss reaches the filter's map and the rows of every ROI of an OPhys window."""
    model = model_for(small(likelihood_readout=True, likelihood_ophys_form="filter"))
    batch = batch_for()
    model(batch)["loss"].backward()
    assert model.likelihood_head.filter_map.weight.grad.abs().sum() > 0
    ophys = batch["modality"][segment_ids(batch["input_cu_seqlens"].long())] == 1
    rois = set(batch["input_unit_index"][ophys].tolist())
    touched = set(model.unit_emb.weight.grad.abs().sum(1).nonzero().squeeze(1).tolist())
    assert rois <= touched
