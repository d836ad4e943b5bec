"""Attention over packed batches (trainer.model.attention): the factored keys/values, every varlen
backend against a per-sample reference, shared queries, the time prior."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.model.attention import BACKENDS, RotaryCrossAttention, time_prior_offsets, varlen_attention
from trainer.model.config import ModelConfig
from trainer.model.network import MultiModalPOYO
from trainer.model.rotary import RotaryTimeEmbedding, rotate


def _factored_case(rotate_values: bool, calcium_gain: bool = False):
    """A cross-attention with non-trivial LayerNorm parameters, 7 unit rows, a W_f direction and 200 tokens."""
    attn = RotaryCrossAttention(dim=32, heads=2, dim_head=8, dropout=0.0, rotate_values=rotate_values,
                                calcium_gain=calcium_gain)
    torch.nn.init.normal_(attn.norm_kv.weight)
    torch.nn.init.normal_(attn.norm_kv.bias)
    rows = torch.randn(7, 32, requires_grad=True)
    direction = torch.randn(32, requires_grad=True)
    index, values = torch.randint(0, 7, (200,)), torch.randn(200) * 3
    rope = RotaryTimeEmbedding(dim_head=8, t_min=1e-4, t_max=4.0)(torch.rand(200))
    return attn, rows, direction, index, values, rope


def _assert_same_outputs_and_gradients(fast, slow, params) -> list[torch.Tensor]:
    weights = [torch.randn_like(t) for t in slow]
    g_fast = torch.autograd.grad(sum((a * w).sum() for a, w in zip(fast, weights)), params)
    g_slow = torch.autograd.grad(sum((a * w).sum() for a, w in zip(slow, weights)), params)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=3e-6, rtol=1e-5)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    return list(g_fast)


@pytest.mark.parametrize("rotate_values", [False, True])
@pytest.mark.parametrize("calcium", [False, True])
def test_factored_keys_values_equal_per_token_projection_and_gradients(calcium, rotate_values):
    torch.manual_seed(0)
    attn, rows, direction, index, values, rope = _factored_case(rotate_values)
    coef, dirn = (values, direction) if calcium else (None, None)
    fast = attn.context_factored(rows, index, rope, coef, dirn)
    x = rows[index] + values[:, None] * direction if calcium else rows[index]
    slow = attn.context(x, rope)
    params = [rows, attn.norm_kv.weight, attn.norm_kv.bias, attn.to_kv.weight] + ([direction] if calcium else [])
    _assert_same_outputs_and_gradients(fast, slow, params)


@pytest.mark.parametrize("rotate_values", [False, True])
def test_calcium_gain_adds_a_per_unit_direction_times_the_value(rotate_values):
    """calcium_gain: kv_t = W LN(a + f c) + f W_g LN(a) / s_t (s_t: the LayerNorm's scale of a + f c),
    computed per unit in context_factored; values and gradients equal the direct per-token form."""
    torch.manual_seed(1)
    attn, rows, direction, index, values, rope = _factored_case(rotate_values, calcium_gain=True)
    fast = attn.context_factored(rows, index, rope, values, direction)
    x = rows[index] + values[:, None] * direction
    k0, v0 = attn.to_kv(attn.norm_kv(x)).unflatten(-1, (2, 2, 8)).unbind(-3)
    inv_s = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + attn.norm_kv.eps)
    gk, gv = (attn.to_gain(attn.norm_kv(rows))[index] * values[:, None] * inv_s).unflatten(-1, (2, 2, 8)).unbind(-3)
    k = rotate(k0 + gk, rope)
    v = rotate(v0 + gv, rope) if rotate_values else v0 + gv
    params = [rows, direction, attn.norm_kv.weight, attn.norm_kv.bias, attn.to_kv.weight, attn.to_gain.weight]
    grads = _assert_same_outputs_and_gradients(fast, (k, v), params)
    assert grads[-1].abs().sum() > 0  # the gain is trained


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


def test_time_prior_offsets_start_attention_local_in_time():
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
