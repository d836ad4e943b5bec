"""The likelihood readout (trainer.model.likelihood): per-class log-likelihoods of a query's units, checked against
a per-unit loop, and what it adds to the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.model.support import N_SESSIONS, N_UNITS, batch_for, model_for, small
from trainer.model.likelihood import BEFORE_S, LikelihoodHead, calcium_innovations, likelihood_logits
from trainer.model.packing import segment_ids

LATENCY = (0.05, 0.1)


def brute_force(head: LikelihoodHead, rows: torch.Tensor, batch: dict):
    """{task: {query: (classes,) log-likelihood}} and the mean fit term per (query, unit) by a loop over queries
    and units: the formulas of the module's docstring, written out once per (query, unit) and token."""
    fits = []
    cu, cu_q = batch["input_cu_seqlens"].tolist(), batch["output_cu_seqlens"].tolist()
    out: dict[int, dict[int, torch.Tensor]] = {}
    for s in range(len(cu) - 1):
        m = int(batch["modality"][s])
        units = batch["input_unit_index"][cu[s]:cu[s + 1]]
        cu_m = batch["sample_unit_cu_seqlens"].tolist()
        members = batch["sample_unit_index"][cu_m[s]:cu_m[s + 1]]
        times = batch["input_timestamps"][cu[s]:cu[s + 1]]
        values = batch["input_values"][cu[s]:cu[s + 1]]
        for q in range(cu_q[s], cu_q[s + 1]):
            t, span = float(batch["output_timestamps"][q]), float(batch["output_span"][q])
            lo = min(max(t - span / 2 + LATENCY[m], 0.0), 1.0)
            hi = min(max(t + span / 2 + LATENCY[m], 0.0), 1.0)
            if hi - lo < 0.05:
                continue
            k = int(batch["output_task_index"][q])
            total = 0.0
            for u in sorted(set(members.tolist())):
                inside = (units == u) & (times >= lo) & (times < hi)
                n = int(inside.sum())
                b, sd, g, v, sharp = head.params(rows[u][None], m)
                code = head.codes[head.tasks[k]]
                drive = F.softplus(sharp[0, k] * (code @ v[0]))
                y = int(batch["output_labels"][q])
                if m == 0:
                    rate = F.softplus(b[0]) + g[0, k] * drive
                    total = total + n * torch.log(rate + 1e-6) - (hi - lo) * rate
                    fits.append((hi - lo) * rate[y] - n * torch.log(rate[y] + 1e-6))
                else:  # OPhys: the innovations x_k - exp(-dt / tau) x_(k-1) of the ROI's tokens in the span
                    amp, tau, off, beta = head.calcium(rows[u][None])
                    mine = (units == u).nonzero().squeeze(1).tolist()
                    mine.sort(key=lambda i: float(times[i]))
                    total_d, n_in, pre_d, n_pre = 0.0, 0, 0.0, 0
                    for j, i in zip(mine[:-1], mine[1:]):
                        d = values[i] - torch.exp(-(times[i] - times[j]) / tau[0]) * values[j]
                        if lo <= float(times[i]) < hi:
                            total_d, n_in = total_d + d, n_in + 1
                        elif max(lo - BEFORE_S, 0.0) <= float(times[i]) < lo:  # the stretch before the span
                            pre_d, n_pre = pre_d + d, n_pre + 1
                    if not n_in:
                        continue
                    rate = F.softplus(b[0]) + g[0, k] * drive
                    spikes = rate * (hi - lo) * n_in / n
                    mean, var = off[0] * n_in + amp[0] * spikes, sd[0] ** 2 * n_in + amp[0] ** 2 * spikes
                    if head.before:
                        mean = mean + beta[0] * pre_d / max(n_pre, 1)
                    ll = -(total_d - mean) ** 2 / (2 * var) - 0.5 * torch.log(var)
                    total = total + ll
                    fits.append(-ll[y])
            out.setdefault(k, {})[q] = total * head.log_scale[m, k].exp()
    return out, torch.stack(fits).mean()


@pytest.mark.parametrize(("seed", "gains", "before"), [(0, "unit", False), (1, "unit", False), (0, "inside", False),
                                                      (1, "inside/unit", False), (0, "inside", True), (1, "unit", True)])
def test_log_likelihoods_equal_a_loop_over_queries_and_units(seed, gains, before):
    """The batched readout against a loop; ``inside``: its sharpness per task inside the softplus as well;
    ``before``: OPhys spans conditioned on the innovations just before them."""
    torch.manual_seed(seed)
    tasks = [("static_gratings", 6), ("drifting_gratings", 8), ("natural_scenes", 119)]
    head = LikelihoodHead(dim=16, rank=4, tasks=tasks, task_gains=gains, before=before)
    with torch.no_grad():  # gains (and sharpness) well away from their start, so every class differs
        if before:  # and beta away from its 0 start
            head.calcium_map.weight[3].uniform_(-0.5, 0.5)
            head.calcium_map.bias[3] = -0.4
        for lin, inside in zip(head.unit_map, head.inside):
            lin.bias[2:6 if inside else 5] = 1.0
            if inside:
                lin.bias[2:5] = torch.tensor([0.5, 1.0, 2.0])
        head.log_scale.uniform_(-1, 1)
    rows = torch.randn(N_UNITS, 16)
    batch = batch_for(seed=seed, spike_rate_hz=1.0)  # some units silent in their window
    assert len(set(batch["sample_unit_index"].tolist())) > len(set(batch["input_unit_index"].tolist()))
    batch["output_span"] = torch.rand(len(batch["output_span"]), generator=torch.Generator().manual_seed(seed)) + 0.1
    q_sample = segment_ids(batch["output_cu_seqlens"].long())
    got, fit = likelihood_logits(head, lambda i: rows[i], batch, q_sample, latency=LATENCY, window_s=1.0)
    want, want_fit = brute_force(head, rows, batch)
    assert torch.allclose(fit, want_fit, rtol=1e-4)
    assert sorted(got) == sorted(want)
    for k, (queries, ll) in got.items():
        assert sorted(queries.tolist()) == sorted(want[k])
        for q, row in zip(queries.tolist(), ll):
            assert torch.allclose(row, want[k][q], rtol=1e-4, atol=1e-3), (k, q)
            assert float((row.max() - row.min()).detach()) > 1e-3  # the classes differ


def test_the_readout_adds_to_the_decoders_logits_and_trains_rows_and_codes():
    """On: each scored query's logits are the decoder's plus its log-likelihoods, and the loss reaches the codes
    and the rows of the batch's units; off, the model has no such head."""
    assert model_for(small()).likelihood_head is None
    model = model_for(small(likelihood_readout=True))
    batch = batch_for()
    out = model(batch)
    q_sample = segment_ids(batch["output_cu_seqlens"].long())
    terms, _ = likelihood_logits(model.likelihood_head, model.unit_rows, batch, q_sample, latency=LATENCY, window_s=1.0)
    model.likelihood_head = None
    plain = model(batch)
    for k, (queries, ll) in terms.items():
        name = model.config.tasks[k].name
        position = {int(q): i for i, q in enumerate(out["query_index"][name])}
        for q, row in zip(queries.tolist(), ll):
            assert torch.allclose(out["logits"][name][position[q]], plain["logits"][name][position[q]] + row,
                                  atol=1e-4)
    model = model_for(small(likelihood_readout=True))
    model(batch)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.likelihood_head.codes.values())
    touched = set(model.unit_emb.weight.grad.abs().sum(1).nonzero().squeeze(1).tolist())
    assert touched == set(batch["sample_unit_index"].tolist())  # silent units' rows too


def test_calcium_innovations_remove_the_decay_in_any_token_order():
    """Two ROIs decaying exponentially at their own tau, one with a jump (a spike's arrival): the innovations are 0
    everywhere but at the jump, where they are its size; each ROI's first token has none; a shuffled token order
    and a second sample with the same ROI give the same values per token."""
    tau = {3: 0.5, 7: 0.2}
    t = torch.arange(10) * 0.1
    x3 = torch.exp(-t / tau[3])
    x3[6:] += 0.4 * torch.exp(-(t[6:] - t[6]) / tau[3])  # a jump of 0.4 at token 6
    x7 = 2.0 * torch.exp(-t / tau[7])
    unit = torch.cat([torch.full((10,), 3), torch.full((10,), 7), torch.full((10,), 3)])
    time = torch.cat([t, t, t])
    values = torch.cat([x3, x7, x3 + 1.0])  # the third block: ROI 3 again, in another sample, offset by 1
    sample = segment_ids(torch.tensor([0, 20, 30]))
    taus = torch.tensor([tau[int(u)] for u in unit])
    d, has = calcium_innovations(unit, time, sample, values, taus)
    assert has.tolist() == [i % 10 != 0 for i in range(30)]
    want = torch.zeros(30)
    want[6] = 0.4
    want[21:] = 1.0 - torch.exp(-0.1 / torch.tensor(0.5))  # the offset decays too: (1 - a) per token
    want[26] += 0.4
    assert torch.allclose(d, want, atol=1e-5)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    # shuffle within each sample (the packing keeps samples contiguous)
    order = torch.cat([perm[perm < 20], perm[perm >= 20]])
    d2, has2 = calcium_innovations(unit[order], time[order], sample[order], values[order], taus[order])
    assert torch.equal(has2, has[order]) and torch.allclose(d2, d[order], atol=1e-6)


def test_a_batch_without_spans_is_refused_in_one_line():
    model = model_for(small(likelihood_readout=True))
    batch = batch_for()
    del batch["output_span"]
    with pytest.raises(ValueError, match="output_span") as e:
        model(batch)
    assert "\n" not in str(e.value)


def test_bad_readout_settings_are_refused():
    with pytest.raises(ValueError, match="likelihood_rank"):
        small(likelihood_readout=True, likelihood_rank=0)


def test_checkpointed_config_round_trips():
    c = small(likelihood_readout=True, likelihood_latency_ephys_s=0.04, likelihood_latency_ophys_s=0.2)
    assert type(c).from_dict(c.to_dict()) == c
    assert N_SESSIONS > 0
    assert c.likelihood_task_gains == "inside"  # the default since docs/model.md section 21
    old = c.to_dict()
    del old["likelihood_task_gains"]  # a checkpoint from before the field was trained with gains per (unit, task)
    assert type(c).from_dict(old).likelihood_task_gains == "unit"
    assert c.likelihood_ophys_form == "filter"  # the default since docs/model.md section 22
    del old["likelihood_ophys_form"]  # and before the field, OPhys was the span's summed innovations
    assert type(c).from_dict(old).likelihood_ophys_form == "sum"


def test_the_readout_can_leave_ophys_to_the_decoder():
    """likelihood_ophys=False: the readout scores EPhys queries only, so OPhys logits are the decoder's."""
    model = model_for(small(likelihood_readout=True, likelihood_ophys=False))
    batch = batch_for()
    q_sample = segment_ids(batch["output_cu_seqlens"].long())
    terms, _ = likelihood_logits(model.likelihood_head, model.unit_rows, batch, q_sample, latency=LATENCY,
                                 window_s=1.0, ophys=False)
    scored = torch.cat([rows for rows, _ in terms.values()])
    assert scored.numel() and (batch["modality"][q_sample[scored]] == 0).all()
    both, _ = likelihood_logits(model.likelihood_head, model.unit_rows, batch, q_sample, latency=LATENCY, window_s=1.0)
    assert (batch["modality"][q_sample[torch.cat([rows for rows, _ in both.values()])]] == 1).any()


def test_the_decoder_is_also_trained_on_its_own_logits():
    """loss = tasks' loss on the summed logits + likelihood_decoder_loss x the same on the decoder's logits alone
    + likelihood_fit x the encoding model's fit; the decoder's logits are the model's without the readout."""
    model = model_for(small(likelihood_readout=True, likelihood_decoder_loss=0.5, likelihood_fit=2.0))
    batch = batch_for()
    out = model(batch)
    q_sample = segment_ids(batch["output_cu_seqlens"].long())
    summed, _ = model._task_losses(out["logits"], out["query_index"], batch, q_sample)
    alone, _ = model._task_losses(out["decoder_logits"], out["query_index"], batch, q_sample)
    assert torch.isclose(out["loss"], summed + 0.5 * alone + 2.0 * out["likelihood_nll"])
    assert not torch.isclose(summed, alone)
    model.likelihood_head = None
    plain = model(batch)
    for name, logits in plain["logits"].items():
        assert torch.allclose(out["decoder_logits"][name], logits)


def test_own_rows_keep_the_readout_off_the_encoders_rows_and_grow_with_the_vocabulary():
    """likelihood_own_rows: the encoding model's fit moves the readout's own table only, never the rows the encoder
    reads; finetuning's vocabulary growth adds rows to both tables."""
    from trainer.model.io import grow_vocab

    model = model_for(small(likelihood_readout=True, likelihood_own_rows=True))
    batch = batch_for()
    with torch.no_grad():
        out = model(batch)
    fit = model._add_likelihood({"logits": dict(out["decoder_logits"]), "query_index": out["query_index"]}, batch)
    fit.backward()
    assert model.unit_emb.weight.grad is None or model.unit_emb.weight.grad.abs().sum() == 0
    assert model.readout_emb.weight.grad.abs().sum() > 0
    assert any(p is model.readout_emb.weight for p in model.param_groups()["embeddings"])
    n = len(model.unit_emb)
    grow_vocab(model, n_units=3)
    assert len(model.unit_emb) == len(model.readout_emb) == n + 3


def test_shared_task_gains_differ_between_tasks_by_the_same_offset_for_every_unit():
    """likelihood_task_gains=shared: a unit's gains on two tasks differ (before the softplus) by a learned offset
    per (modality, task), the same for every unit; per unit (the default) they are free."""
    tasks = [("static_gratings", 6), ("drifting_gratings", 8), ("natural_scenes", 119)]
    torch.manual_seed(0)
    rows = torch.randn(20, 16)
    shared = LikelihoodHead(dim=16, rank=4, tasks=tasks, task_gains="shared")
    free = LikelihoodHead(dim=16, rank=4, tasks=tasks)
    with torch.no_grad():
        shared.task_gain_offset.uniform_(-1, 1)
    for m in (0, 1):
        logit = torch.log(torch.expm1(shared.params(rows, m)[2].double()))  # softplus^-1
        step = logit - logit[:, :1]
        assert torch.allclose(step, (shared.task_gain_offset[m] - shared.task_gain_offset[m, 0]).double().expand_as(step),
                              atol=1e-4)
        free_step = torch.log(torch.expm1(free.params(rows, m)[2].double()))
        assert (free_step[:, 1] - free_step[:, 0]).std() > 0.01
    assert free.task_gain_offset is None
    mixed = LikelihoodHead(dim=16, rank=4, tasks=tasks, task_gains="inside/unit")  # EPhys / OPhys
    assert mixed.inside == [True, False] and mixed.unit_map[0].out_features == mixed.unit_map[1].out_features + 1
    assert torch.equal(mixed.params(rows, 1)[4], torch.ones(20, 3))  # OPhys: no sharpness
    with pytest.raises(ValueError, match="likelihood_task_gains"):
        small(likelihood_readout=True, likelihood_task_gains="region")
    with pytest.raises(ValueError, match="likelihood_task_gains"):
        small(likelihood_readout=True, likelihood_task_gains="inside/unit/shared")
