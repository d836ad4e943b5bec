"""The model on packed batches: equal to a padded recomputation, samples isolated from each other,
invariant to token order within a sample, modalities routed to their own encoder; the loss weighting;
the blocks (dropout, zero-initialised residual branches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.model.reference import padded_reference
from tests.model.support import (
    N_SESSIONS,
    N_UNITS,
    TOKEN_KEYS,
    assert_close_nan,
    batch_for,
    logits_by_query,
    model_for,
    pack,
    small,
    unpack,
)
from trainer.model.config import ModelConfig, TaskSpec
from trainer.model.layers import dropout
from trainer.model.network import MultiModalPOYO
from trainer.model.synthetic import synthetic_batch
from trainer.model.variants import VARIANTS, build_model


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_equals_padded_for_a_mixed_batch(variant):
    model = model_for(build_model(variant, small(), N_UNITS, N_SESSIONS).config)
    batch = batch_for()
    with torch.no_grad():
        assert_close_nan(logits_by_query(model, batch), padded_reference(model, batch))


def test_packed_equals_padded_with_rotated_values_and_stacked_cross_attention():
    model = model_for(small(rotate_values=True, encoder_ca_depth=2, modality_depth=1))
    batch = batch_for()
    with torch.no_grad():
        assert_close_nan(logits_by_query(model, batch), padded_reference(model, batch))


@pytest.mark.parametrize("sinks", [False, True])
def test_changing_sample_j_never_changes_sample_i(sinks):
    model = model_for(small(encoder_sinks=sinks))
    samples = unpack(batch_for())
    before = logits_by_query(model, pack(samples))
    j = 2
    other = unpack(batch_for(seed=7))[j]
    changed = dict(samples[j])
    keep = len(other["input_unit_index"]) // 2  # fewer tokens: every later offset moves
    for k in TOKEN_KEYS:
        changed[k] = other[k][:keep]
    changed["session_index"] = other["session_index"]
    after = logits_by_query(model, pack(samples[:j] + [changed] + samples[j + 1:]))
    cu_q = pack(samples)["output_cu_seqlens"].tolist()
    mine = torch.zeros(len(before), dtype=torch.bool)
    mine[cu_q[j]:cu_q[j + 1]] = True
    assert_close_nan(before[~mine], after[~mine], atol=1e-6)
    assert not torch.allclose(before[mine].nan_to_num(), after[mine].nan_to_num())


@pytest.mark.parametrize("sinks", [False, True])
def test_sinks_let_the_latents_count_spikes_not_only_see_which_units_fired(sinks):
    """Every spike of every sample twice (same units, same times): a softmax average over the tokens cannot
    tell, so without sinks nothing changes; a sink's share of the attention falls as the spikes double."""
    model = model_for(small(encoder_sinks=sinks))
    samples = unpack(batch_for(modalities=[0, 0, 0]))
    doubled = [{**s, **{k: torch.cat([s[k], s[k]]) for k in TOKEN_KEYS}} for s in samples]
    once, twice = logits_by_query(model, pack(samples)), logits_by_query(model, pack(doubled))
    if sinks:
        assert (once - twice).nan_to_num().abs().max() > 1e-4
    else:
        assert_close_nan(once, twice)


def test_outputs_do_not_depend_on_token_order_within_a_sample():
    model = model_for(small())
    samples = unpack(batch_for())
    g = torch.Generator().manual_seed(0)
    shuffled = []
    for s in samples:
        perm = torch.randperm(len(s["input_unit_index"]), generator=g)
        shuffled.append({**s, **{k: s[k][perm] for k in TOKEN_KEYS}})
    assert_close_nan(logits_by_query(model, pack(samples)), logits_by_query(model, pack(shuffled)))


def test_ephys_only_batch_never_reaches_the_ophys_encoder():
    model = build_model("main", small(), N_UNITS, N_SESSIONS).train()
    model(batch_for(modalities=[0, 0, 0]))["loss"].backward()
    ephys, ophys = model.encoders
    assert all(p.grad is None for p in ophys.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ephys.cross.parameters())


def test_loss_weights_tasks_by_samples_asking_and_ignores_unlabelled():
    config = small(tasks=(TaskSpec("a", 3), TaskSpec("b", 4), TaskSpec("speed", 2, kind="regression")))
    model = model_for(config)
    batch = synthetic_batch(modalities=[0, 1, 0], n_units=N_UNITS, n_sessions=N_SESSIONS, config=config,
                            queries_per_sample=2, seed=1)
    batch["output_task_index"] = torch.tensor([0, 0, 1, 1, 0, 2])
    batch["output_labels"] = torch.tensor([1, -1, 2, 3, 0, 0])
    batch["output_values"] = torch.randn(6, 2)
    out = model(batch)
    ce = {n: F.cross_entropy(out["logits"][n], batch["output_labels"][out["query_index"][n]].clamp_min(0),
                             reduction="none") for n in ("a", "b")}
    a = (ce["a"][0] + ce["a"][2]) / 2  # query 1 is unlabelled; samples 0 and 2 ask for "a"
    b = ce["b"].mean()  # sample 1 only
    speed = F.mse_loss(out["logits"]["speed"], batch["output_values"][5:]).mean()  # sample 2 only
    expected = (a * 2 + b * 1 + speed * 1) / 3
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.parametrize("changes", [{}, {"unit_rank": 4}, {"count_loss": 1.0}])
def test_param_groups_cover_every_parameter_once(changes):
    model = model_for(small(**changes))
    groups = model.param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_a_unit_rank_model_is_the_full_model_with_rows_through_the_shared_map():
    """unit_rank 4: each unit is 4 numbers; the model equals a full-width one whose table holds those rows mapped
    by unit_up, so the rank only restricts what a unit can be. Growing adds 4-number rows and leaves the map."""
    low = model_for(small(unit_rank=4))
    assert low.unit_emb.weight.shape == (N_UNITS, 4)
    full = model_for(small())
    state = {k: v for k, v in low.state_dict().items() if not k.startswith(("unit_emb.", "unit_up."))}
    full.load_state_dict({**state, "unit_emb.weight": low.unit_up(low.unit_emb.weight).detach()})
    batch = batch_for()
    assert_close_nan(logits_by_query(low, batch), logits_by_query(full, batch), atol=1e-5)
    up = low.unit_up.weight.detach().clone()
    new = low.unit_emb.grow(3)
    assert low.unit_emb.weight.shape == (N_UNITS + 3, 4) and torch.equal(low.unit_up.weight, up)
    assert low.unit_rows(new).shape == (3, low.config.dim)
    with pytest.raises(ValueError, match="unit_rank"):
        small(unit_rank=-1)


def test_zero_init_residual_makes_every_latent_block_the_identity():
    cfg = ModelConfig.small(zero_init_residual=True)
    model = MultiModalPOYO(config=cfg, n_units=10, n_sessions=2)
    x = torch.randn(3, cfg.n_latents, cfg.dim)
    rope = model.rotary(model.latent_times)
    for block in model.trunk:
        torch.testing.assert_close(block(x, rope), x)


def test_dropout_keeps_the_expectation_and_drops_at_the_configured_rate():
    torch.manual_seed(0)
    x = torch.ones(400_003, requires_grad=True)
    y = dropout(x, 0.2, True)
    assert (y == 0).float().mean().item() == pytest.approx(0.2, abs=0.005)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient flows exactly where the value was kept
    assert dropout(x, 0.2, False) is x
