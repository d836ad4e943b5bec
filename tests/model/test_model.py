"""The model of trainer/: packing, isolation, invariances, variants, checkpoints, vocabularies.

Everything runs the small preset on CPU with batches built here in the docs/batch.md layout.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from trainer.model.variants import VARIANTS, build_model, param_table
from trainer.model.attention import BACKENDS, RotaryCrossAttention, varlen_attention
from trainer.model.config import ModelConfig, TaskSpec
from trainer.model.io import grow_vocab, load_checkpoint, load_checkpoint_with_extra, save_checkpoint
from trainer.model.network import MultiModalPOYO, n_parameters
from trainer.model.synthetic import synthetic_batch
from trainer.model.rotary import RotaryTimeEmbedding, rotate

N_UNITS, N_SESSIONS = 120, 12
MIXED = [0, 1, 1, 0, 1, 0]


def small(**kw) -> ModelConfig:
    return ModelConfig.small(**kw)


def model_for(config: ModelConfig, seed: int = 0) -> MultiModalPOYO:
    torch.manual_seed(seed)
    return MultiModalPOYO(config=config, n_units=N_UNITS, n_sessions=N_SESSIONS).eval()


def batch_for(modalities=MIXED, seed: int = 0, **kw):
    kw = {"units_per_sample": 10, "rois_per_sample": 5, "frame_hz": 10.0, "queries_per_sample": 3} | kw
    return synthetic_batch(modalities=modalities, n_units=N_UNITS, n_sessions=N_SESSIONS, seed=seed, **kw)


# ----------------------------------------------------------------------------- batch helpers

TOKEN_KEYS = ("input_unit_index", "input_timestamps", "input_values")
QUERY_KEYS = ("output_timestamps", "output_task_index", "output_labels", "output_weights")


def unpack(batch) -> list[dict]:
    """Packed batch -> one dict per sample."""
    cu_in, cu_out = batch["input_cu_seqlens"].tolist(), batch["output_cu_seqlens"].tolist()
    return [{**{k: batch[k][cu_in[i]:cu_in[i + 1]] for k in TOKEN_KEYS},
             **{k: batch[k][cu_out[i]:cu_out[i + 1]] for k in QUERY_KEYS},
             "modality": batch["modality"][i], "session_index": batch["session_index"][i]}
            for i in range(len(cu_in) - 1)]


def pack(samples: list[dict]):
    """One dict per sample -> packed batch (docs/batch.md)."""
    def cu(key):
        lens = torch.tensor([len(s[key]) for s in samples])
        return F.pad(lens.cumsum(0), (1, 0)).int()
    return {**{k: torch.cat([s[k] for s in samples]) for k in TOKEN_KEYS + QUERY_KEYS},
            "modality": torch.stack([s["modality"] for s in samples]),
            "session_index": torch.stack([s["session_index"] for s in samples]),
            "input_cu_seqlens": cu("input_unit_index"), "output_cu_seqlens": cu("output_timestamps"),
            "window_s": torch.tensor(1.0)}


def logits_by_query(model, batch) -> torch.Tensor:
    """All tasks' logits back in query order, padded to the widest head: (Q, max classes)."""
    out = model(batch)
    width = max(t.out_dim for t in model.config.tasks)
    full = torch.full((len(batch["output_timestamps"]), width), float("nan"))
    for name, rows in out["query_index"].items():
        full[rows.cpu(), :out["logits"][name].shape[1]] = out["logits"][name].detach().float().cpu()
    return full


def assert_close_nan(a, b, atol=1e-5):
    assert torch.equal(a.isnan(), b.isnan())
    torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), atol=atol, rtol=max(1e-4, atol))


# ----------------------------------------------------------------------------- padded reference


def pair_rotate(x, t, omega):
    """Independent R(t) as the papers write it: 2x2 blocks [[cos, -sin], [sin, cos]] on pairs (2j, 2j+1)."""
    phase = (t.double()[..., None] * omega).remainder(2 * math.pi).float()  # float64 phases, like the model
    cos, sin = phase.cos(), phase.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


def padded_reference(model: MultiModalPOYO, batch) -> torch.Tensor:
    """The model recomputed with padded (B, L) tensors, boolean key masks, per-token LayerNorm and
    projections and an independent rotation; returns logits like ``logits_by_query``."""
    c, omega, d = model.config, model.rotary.omega, model.config.dim_head
    cu, cu_q = batch["input_cu_seqlens"].long(), batch["output_cu_seqlens"].long()
    lens, nq = torch.diff(cu), torch.diff(cu_q)
    b_count, m = len(lens), c.n_latents

    def pad(x, lens_, cu_):
        width = int(lens_.max())
        sample = torch.repeat_interleave(torch.arange(len(lens_)), lens_)
        pos = torch.arange(len(x)) - cu_[:-1][sample]
        out = x.new_zeros((len(lens_), width, *x.shape[1:]))
        out[sample, pos] = x
        return out, torch.arange(width)[None] < lens_[:, None]

    units, mask = pad(batch["input_unit_index"], lens, cu)
    times, _ = pad(batch["input_timestamps"], lens, cu)
    values, _ = pad(batch["input_values"], lens, cu)
    lat_t = model.latent_times
    lat_rope = model.rotary(lat_t)

    def attend(attn, x_q, t_q, ctx, t_k, key_mask, rotate_values):
        q = attn.to_q(attn.norm_q(x_q)).unflatten(-1, (attn.heads, d))
        kv = attn.to_kv(attn.norm_kv(ctx)).unflatten(-1, (2, attn.heads, d))
        k = kv[..., 0, :, :]
        if attn.q_time is not None:  # the time prior's learned offsets, added before the rotation
            q, k = q + attn.q_time, k + attn.k_time
        q = pair_rotate(q, t_q[..., None], omega)
        k = pair_rotate(k, t_k[..., None], omega)
        v = pair_rotate(kv[..., 1, :, :], t_k[..., None], omega) if rotate_values else kv[..., 1, :, :]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=None if key_mask is None else key_mask[:, None, None, :])
        o = o.transpose(1, 2)
        if rotate_values:
            o = pair_rotate(o, -t_q[..., None], omega)
        return attn.to_out(o.flatten(-2))

    latents_by_encoder = []
    for enc in model.encoders:
        x = model.unit_emb(units)
        if enc.value_proj is not None:
            x = x + values[..., None] * enc.value_proj.weight
        z = enc.latents.repeat(c.n_latent_steps, 1).expand(b_count, m, -1)
        t_lat = lat_t.expand(b_count, m)
        for attn, ffn in zip(enc.cross, enc.cross_ffn):
            z = z + attend(attn, z, t_lat, x, times, mask, c.rotate_values)
            z = z + ffn(z)
        for block in enc.blocks:
            z = block(z, lat_rope)
        latents_by_encoder.append(z)
    if len(latents_by_encoder) == 1:
        latents = latents_by_encoder[0]
    else:
        latents = torch.where((batch["modality"] == 0)[:, None, None], *latents_by_encoder)
    for block in model.trunk:
        latents = block(latents, lat_rope)
    tq, qmask = pad(batch["output_timestamps"], nq, cu_q)
    task, _ = pad(batch["output_task_index"], nq, cu_q)
    queries = model.task_emb(task) + model.session_emb(batch["session_index"])[:, None]
    y = queries + attend(model.dec_attn, queries, tq, latents, lat_t.expand(b_count, m), None, False)
    y = (y + model.dec_ffn(y))[qmask]
    width = max(t.out_dim for t in c.tasks)
    full = torch.full((len(y), width), float("nan"))
    for k, t in enumerate(c.tasks):
        rows = batch["output_task_index"] == k
        full[rows, :t.out_dim] = model.heads[t.name](y[rows])
    return full


# ----------------------------------------------------------------------------- tests


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


def test_changing_sample_j_never_changes_sample_i():
    model = model_for(small())
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


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_and_matches_main_parameter_count(variant):
    config = small(ffn_dropout=0.1, attn_dropout=0.1, residual_dropout=0.1)
    torch.manual_seed(0)
    model = build_model(variant, config, N_UNITS, N_SESSIONS).train()
    main = n_parameters(build_model("main", config, N_UNITS, N_SESSIONS), embeddings=False)
    assert abs(n_parameters(model, embeddings=False) / main - 1) <= 0.05
    batch = batch_for(queries_per_sample=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_param_table_lists_every_variant_within_tolerance():
    rows = param_table(small(), N_UNITS, N_SESSIONS, printer=None)
    assert [r["variant"] for r in rows] == list(VARIANTS)
    assert all(abs(r["vs_main"]) <= 0.05 for r in rows)


def test_save_load_round_trip_with_weights_only_gives_identical_outputs(tmp_path):
    model = model_for(small(rotate_values=True))
    batch = batch_for()
    save_checkpoint(model, str(tmp_path / "ck.pt"), variant="main")
    loaded = load_checkpoint(str(tmp_path / "ck.pt")).eval()
    assert torch.equal(logits_by_query(model, batch).nan_to_num(), logits_by_query(loaded, batch).nan_to_num())
    # plain state_dict route
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = model_for(small(rotate_values=True), seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert torch.equal(logits_by_query(model, batch).nan_to_num(), logits_by_query(fresh, batch).nan_to_num())


def test_checkpoint_extra_entries_and_execution_changes_come_back(tmp_path):
    model = model_for(small())
    save_checkpoint(model, str(tmp_path / "ck.pt"), meta='{"variant": "main"}', step=3)
    loaded, extra = load_checkpoint_with_extra(str(tmp_path / "ck.pt"), amp=False)
    assert extra == {"meta": '{"variant": "main"}', "step": 3}
    assert loaded.config == model.config.replace(amp=False)
    assert torch.equal(logits_by_query(model, batch_for()).nan_to_num(), logits_by_query(loaded.eval(), batch_for()).nan_to_num())


def test_growing_the_vocabularies_keeps_old_embeddings():
    model = model_for(small())
    units, sessions = model.unit_emb.weight.detach().clone(), model.session_emb.weight.detach().clone()
    new_units, new_sessions = grow_vocab(model, n_units=30, n_sessions=2)
    assert new_units.tolist() == list(range(N_UNITS, N_UNITS + 30))
    assert new_sessions.tolist() == [N_SESSIONS, N_SESSIONS + 1]
    assert torch.equal(model.unit_emb.weight[:N_UNITS], units)
    assert torch.equal(model.session_emb.weight[:N_SESSIONS], sessions)
    assert model.unit_emb.weight.requires_grad and len(model.unit_emb) == N_UNITS + 30
    # the grown model reads the new rows
    batch = synthetic_batch(modalities=[0, 1], n_units=N_UNITS + 30, n_sessions=N_SESSIONS + 2, seed=3)
    batch["input_unit_index"] = batch["input_unit_index"] % 30 + N_UNITS
    model.train()(batch)["loss"].backward()
    assert model.unit_emb.weight.grad[N_UNITS:].abs().sum() > 0


def test_param_groups_cover_every_parameter_once():
    model = model_for(small())
    groups = model.param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


@pytest.mark.parametrize("rotate_values", [False, True])
@pytest.mark.parametrize("calcium", [False, True])
def test_factored_keys_values_equal_per_token_projection_and_gradients(calcium, rotate_values):
    torch.manual_seed(0)
    attn = RotaryCrossAttention(dim=32, heads=2, dim_head=8, dropout=0.0, rotate_values=rotate_values)
    torch.nn.init.normal_(attn.norm_kv.weight)
    torch.nn.init.normal_(attn.norm_kv.bias)
    rows = torch.randn(7, 32, requires_grad=True)
    direction = torch.randn(32, requires_grad=True)
    index, values = torch.randint(0, 7, (200,)), torch.randn(200) * 3
    rope = RotaryTimeEmbedding(dim_head=8, t_min=1e-4, t_max=4.0)(torch.rand(200))
    coef, dirn = (values, direction) if calcium else (None, None)
    fast = attn.context_factored(rows, index, rope, coef, dirn)
    x = rows[index] + values[:, None] * direction if calcium else rows[index]
    slow = attn.context(x, rope)
    weights = [torch.randn_like(t) for t in slow]
    params = [rows, attn.norm_kv.weight, attn.norm_kv.bias, attn.to_kv.weight] + ([direction] if calcium else [])
    g_fast = torch.autograd.grad(sum((a * w).sum() for a, w in zip(fast, weights)), params)
    g_slow = torch.autograd.grad(sum((a * w).sum() for a, w in zip(slow, weights)), params)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=3e-6, rtol=1e-5)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")  # nested: prototype API; flex: eager (uncompiled) on CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: what the CUDA path runs in
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "flash"])
def test_varlen_backends_match_a_per_sample_reference(backend, dtype):
    torch.manual_seed(0)
    lens_k, lens_q, h, d = torch.tensor([5, 0, 17, 9]), torch.tensor([3, 2, 4, 1]), 2, 8
    cu_k, cu_q = F.pad(lens_k.cumsum(0), (1, 0)), F.pad(lens_q.cumsum(0), (1, 0))
    q, k, v = (torch.randn(int(n), h, d).to(dtype) for n in (lens_q.sum(), lens_k.sum(), lens_k.sum()))
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    for keep in (torch.tensor([0, 2, 3]), torch.arange(4)):  # without, then with an empty sample
        kq = torch.cat([torch.arange(cu_q[i], cu_q[i + 1]) for i in keep])
        kk = torch.cat([torch.arange(cu_k[i], cu_k[i + 1]) for i in keep])
        cq, ck = F.pad(lens_q[keep].cumsum(0), (1, 0)), F.pad(lens_k[keep].cumsum(0), (1, 0))
        out = varlen_attention(q[kq], k[kk], v[kk], cu_q=cq, cu_k=ck, max_q=4, max_k=17, backend=backend)
        for i in range(len(keep)):
            qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
            if lens_k[keep[i]] == 0:
                assert torch.all(out[qs] == 0)
                continue
            assert out.dtype == dtype
            qf, kf, vf = q[kq][qs].float(), k[kk][ks].float(), v[kk][ks].float()
            att = torch.softmax(torch.einsum("qhd,khd->hqk", qf, kf) / math.sqrt(d), -1)
            torch.testing.assert_close(out[qs].float(), torch.einsum("hqk,khd->qhd", att, vf), **tol)


def test_shared_queries_equal_repeated_queries():
    torch.manual_seed(0)
    lens = torch.tensor([4, 9, 6])
    cu = F.pad(lens.cumsum(0), (1, 0))
    q, k, v = torch.randn(5, 2, 8), torch.randn(19, 2, 8), torch.randn(19, 2, 8)
    shared = varlen_attention(q, k, v, cu_q=None, cu_k=cu, max_q=5, max_k=9, shared_q=True, backend="loop")
    repeated = varlen_attention(q.repeat(3, 1, 1), k, v, cu_q=torch.arange(4) * 5, cu_k=cu, max_q=5, max_k=9,
                                backend="loop")
    torch.testing.assert_close(shared, repeated)


def test_rotary_scores_depend_only_on_time_difference():
    rope = RotaryTimeEmbedding(dim_head=16, t_min=1e-4, t_max=4.0)
    periods = 2 * math.pi / rope.omega.double()
    assert periods[0].item() == pytest.approx(1e-4, rel=1e-4) and periods[-1].item() == pytest.approx(4.0, rel=1e-4)
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)

    def score(tq, tk):
        return (rotate(q, rope(torch.tensor([tq]))) * rotate(k, rope(torch.tensor([tk])))).sum().item()
    # times exact in float32, so only the rotation's own rounding is left
    assert score(0.25, 0.125) == pytest.approx(score(0.75, 0.625), abs=1e-5)
    assert score(0.25, 0.125) != pytest.approx(score(0.25, 0.1875), abs=1e-3)


def test_partial_rotary_leaves_the_content_half_of_each_head_unrotated():
    rope = RotaryTimeEmbedding(dim_head=16, t_min=1e-2, t_max=4.0, rotate_frac=0.5)
    periods = 2 * math.pi / rope.omega[:4].double()
    assert periods[0].item() == pytest.approx(1e-2, rel=1e-4) and periods[3].item() == pytest.approx(4.0, rel=1e-4)
    assert (rope.omega[4:] == 0).all()
    x = torch.randn(3, 1, 16)
    y = rotate(x, rope(torch.tensor([0.1, 0.4, 0.9])))
    torch.testing.assert_close(y[..., 8:], x[..., 8:])  # pairs 4..7: identity at every time
    assert not torch.allclose(y[..., :8], x[..., :8])
    with pytest.raises(ValueError, match="rotate_frac"):
        RotaryTimeEmbedding(dim_head=16, t_min=1e-2, t_max=4.0, rotate_frac=0.0)


def test_time_prior_offsets_start_attention_local_in_time():
    from trainer.model.attention import time_prior_offsets

    rope = RotaryTimeEmbedding(dim_head=32, t_min=1e-2, t_max=4.0, rotate_frac=0.5)
    off = time_prior_offsets(2, 32, rope.omega.float(), amplitude=1.0)
    assert (off[:, 1::2] == 0).all() and (off[:, 16:] == 0).all()  # real parts of rotated pairs only

    def score(dt):
        a = rotate(off[None], rope(torch.tensor([0.5])))
        b = rotate(off[None], rope(torch.tensor([0.5 + dt])))
        return float((a * b).sum(-1)[0, 0]) / 32 ** 0.5

    near, far = score(0.0), [score(dt) for dt in (0.25, 0.4, -0.3)]
    assert near == pytest.approx(6.0, rel=1e-4)  # 6 rotated pairs with periods >= 50 ms, 1 logit each
    assert all(near - f > 3.0 for f in far)
    model = MultiModalPOYO(config=ModelConfig.small(dim_head=32, time_prior=1.0), n_units=10, n_sessions=2)
    names = {n for n, _ in model.named_parameters()}
    assert {"encoders.0.cross.0.q_time", "dec_attn.k_time", "trunk.0.attn.q_time"} <= names


def test_zero_init_residual_makes_every_latent_block_the_identity():
    cfg = ModelConfig.small(zero_init_residual=True)
    model = MultiModalPOYO(config=cfg, n_units=10, n_sessions=2)
    x = torch.randn(3, cfg.n_latents, cfg.dim)
    rope = model.rotary(model.latent_times)
    for block in model.trunk:
        torch.testing.assert_close(block(x, rope), x)


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


def test_dropout_keeps_the_expectation_and_drops_at_the_configured_rate():
    from trainer.model.layers import dropout

    torch.manual_seed(0)
    x = torch.ones(400_003, requires_grad=True)
    y = dropout(x, 0.2, True)
    assert (y == 0).float().mean().item() == pytest.approx(0.2, abs=0.005)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient flows exactly where the value was kept
    assert dropout(x, 0.2, False) is x


def test_rotation_fallback_for_half_precision_matches_the_complex_path():
    from trainer.model.rotary import rotate_into

    rope = RotaryTimeEmbedding(dim_head=8, t_min=1e-4, t_max=4.0)(torch.rand(50))
    x = torch.randn(50, 3, 8)
    fast = rotate_into(x, rope)
    torch.testing.assert_close(rotate_into(x.double(), rope).float(), fast)
    torch.testing.assert_close(rotate_into(x.bfloat16(), rope).float(), fast, atol=3e-2, rtol=3e-2)
    strided = torch.randn(50, 3, 9)[..., 1:]  # odd offset: not viewable as complex pairs
    torch.testing.assert_close(rotate_into(strided, rope), rotate_into(strided.contiguous(), rope))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("backend", ["auto", "nested", "flex", "flash"])
def test_cuda_backends_match_the_cpu_reference_and_train(backend, amp):
    from trainer.model.attention import _flash_varlen

    if backend == "flash" and _flash_varlen() is None:
        pytest.skip("flash-attn not installed")
    config = small(attn_backend=backend, amp=amp)
    batch = batch_for()
    reference = logits_by_query(model_for(small()), batch)
    model = model_for(config).cuda()
    on_gpu = {k: v.cuda() for k, v in batch.items()}
    tol = 5e-2 if amp or backend == "flash" else 1e-4  # flash-attn computes in bf16
    assert_close_nan(logits_by_query(model, on_gpu), reference, atol=tol)
    model.train()(on_gpu)["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor: no codegen for complex ops (falls back)
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_model_matches_eager_outputs_and_gradients():
    """``compile=True`` (torch.compile of the dense blocks, inductor on CPU here) changes no number
    beyond float rounding, forward or backward, and keeps the state_dict keys."""
    torch.manual_seed(0)
    cfg = ModelConfig.small()
    batch = synthetic_batch(modalities=[0, 1, 0, 1], n_units=50, n_sessions=3, config=cfg)
    eager = MultiModalPOYO(config=cfg, n_units=50, n_sessions=3).eval()
    compiled = MultiModalPOYO(config=cfg.replace(compile=True), n_units=50, n_sessions=3).eval()
    compiled.load_state_dict(eager.state_dict())
    a, c = eager(batch), compiled(batch)
    for task in a["logits"]:
        torch.testing.assert_close(c["logits"][task], a["logits"][task], atol=1e-5, rtol=1e-5)
    a["loss"].backward()
    c["loss"].backward()
    grads = {n: p.grad for n, p in compiled.named_parameters()}
    for n, p in eager.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend", ["loop", "nested"])
def test_bf16_autocast_path_runs_and_stays_close_to_fp32(backend):
    """The bf16 autocast path CUDA runs, exercised on CPU (``amp_on_cpu``): same loss within bf16
    rounding, gradients for the same parameters, all finite."""
    torch.manual_seed(0)
    cfg = ModelConfig.small(attn_backend=backend)
    batch = synthetic_batch(modalities=[0, 1, 0, 1], n_units=50, n_sessions=3, config=cfg)
    fp32 = MultiModalPOYO(config=cfg, n_units=50, n_sessions=3).eval()
    bf16 = MultiModalPOYO(config=cfg.replace(amp_on_cpu=True), n_units=50, n_sessions=3).eval()
    bf16.load_state_dict(fp32.state_dict())
    a, b = fp32(batch), bf16(batch)
    # logits come back float32 (the heads' output is cast up); that they differ at all from fp32's
    # shows the blocks really ran in bf16
    assert all(v.dtype == torch.float32 for v in b["logits"].values())
    assert any(not torch.equal(b["logits"][t], a["logits"][t]) for t in a["logits"])
    for t in a["logits"]:
        torch.testing.assert_close(b["logits"][t], a["logits"][t], atol=0.1, rtol=0.05)
    assert b["loss"].dtype == torch.float32 and torch.isfinite(b["loss"])
    torch.testing.assert_close(b["loss"], a["loss"], atol=0.05, rtol=0.02)
    a["loss"].backward()
    b["loss"].backward()
    for (name, p), q in zip(fp32.named_parameters(), bf16.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all(), name
