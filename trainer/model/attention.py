"""Attention over packed (unpadded) sequences, and the rotary attention blocks built on it.

Sample ``i`` owns query rows ``[cu_q[i], cu_q[i+1])`` and key rows ``[cu_k[i], cu_k[i+1])``; a query
only ever sees the keys of its own sample. Nothing is padded and no boolean mask is built.

Backends of ``varlen_attention`` (``backend="auto"`` picks by device):

- ``loop``   CPU reference and CPU default: one ``scaled_dot_product_attention`` per sample on
             views of the packed tensors (``split``, so the backward is one concatenation).
             Measured on 2 CPU threads, 32 samples x ~1,250 keys, 128 latent queries, 2 heads of 64,
             forward+backward of the attention alone: 80 ms, against 108 ms padded with a boolean
             mask and 650 ms with nested jagged tensors (whose CPU path falls back to unbinding).
- ``nested`` CUDA default: SDPA on nested jagged tensors, which dispatches to PyTorch's fused
             flash / memory-efficient varlen kernels.
- ``flash``  ``flash_attn.flash_attn_varlen_func`` when flash-attn is installed (preferred on CUDA).
- ``flex``   FlexAttention with a document mask (compiled on CUDA; eager elsewhere, for testing).

The encoder's latent queries are the same learned vectors, at the same times, in every sample, so
they are passed once (``shared_q=True``, shape (M, H, d)) instead of repeated per sample.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.model.packing import segment_ids
from trainer.model.rotary import rotate, rotate_back, rotate_into

BACKENDS = ("loop", "nested", "flex", "flash")
Rope = Tensor  # rotations exp(i 2 pi t / T_j), complex (N, 1, dim_head/2) (trainer.model.rotary)


@functools.cache
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` -> ``flash`` (if importable) or ``nested`` on CUDA, ``loop`` elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return "flash" if _flash_varlen() is not None else "nested"
        return "loop"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; one of {BACKENDS} or 'auto'")
    if name == "flash" and _flash_varlen() is None:
        raise RuntimeError("attention backend 'flash' needs the flash-attn package")
    return name


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, *, cu_q: Tensor | None, cu_k: Tensor, max_q: int, max_k: int,
    dropout_p: float = 0.0, backend: str = "auto", shared_q: bool = False,
) -> Tensor:
    """Softmax attention within each packed sample.

    Shapes:
        q: (Nq, H, d) packed queries, or (M, H, d) queries shared by every sample when ``shared_q``
        k, v: (Nk, H, d) packed keys / values
        cu_q: (S+1,) query offsets (ignored when ``shared_q``); cu_k: (S+1,) key offsets
        max_q, max_k: longest query / key run of one sample (what varlen kernels need)
        returns (Nq, H, d), or (S*M, H, d) when ``shared_q`` (sample-major)

    A sample without keys gets a zero output.
    """
    backend = resolve_backend(backend, q.device)
    n_samples = cu_k.numel() - 1
    if shared_q:
        m = q.shape[0]
        if backend != "loop":  # the fused kernels want one query row per (sample, latent)
            q = q.repeat(n_samples, 1, 1)
            cu_q = torch.arange(n_samples + 1, device=q.device, dtype=cu_k.dtype) * m
            max_q = m
    if backend == "loop":
        return _loop(q, k, v, cu_q, cu_k, dropout_p, shared_q)
    if backend == "nested":
        if bool((torch.diff(cu_q) == 0).any() | (torch.diff(cu_k) == 0).any()):
            # a jagged tensor cannot hold an empty sequence; such batches (a window without tokens
            # or without queries) take the reference path
            return _loop(q, k, v, cu_q, cu_k, dropout_p, False)
        return _nested(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p)
    if backend == "flash":
        fn = _flash_varlen()
        dt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
        out = fn(q, k, v, cu_q.int(), cu_k.int(), max_q, max_k, dropout_p=dropout_p)
        return out.to(q.dtype)
    return _flex(q, k, v, cu_q, cu_k, dropout_p)


def _loop(q, k, v, cu_q, cu_k, dropout_p, shared_q):
    lens_k = torch.diff(cu_k).tolist()
    ks, vs = k.split(lens_k), v.split(lens_k)
    qs = [q] * len(lens_k) if shared_q else q.split(torch.diff(cu_q).tolist())
    outs = []
    for qi, ki, vi in zip(qs, ks, vs):
        if qi.shape[0] == 0 or ki.shape[0] == 0:
            outs.append(torch.zeros_like(qi))
            continue
        o = F.scaled_dot_product_attention(
            qi.transpose(0, 1)[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None], dropout_p=dropout_p
        )
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def _nested(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p):
    def njt(x, cu, mx):  # (N, H, d) -> (S, H, j, d)
        return torch.nested.nested_tensor_from_jagged(x.contiguous(), offsets=cu.long(), max_seqlen=mx).transpose(1, 2)

    out = F.scaled_dot_product_attention(njt(q, cu_q, max_q), njt(k, cu_k, max_k), njt(v, cu_k, max_k),
                                         dropout_p=dropout_p)
    return out.transpose(1, 2).values()


@functools.cache
def _flex_fns(device_type: str):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if device_type == "cuda":
        flex_attention = torch.compile(flex_attention, dynamic=True)
    return flex_attention, create_block_mask


def _flex(q, k, v, cu_q, cu_k, dropout_p):
    if dropout_p > 0:
        raise NotImplementedError("flex backend has no attention dropout; set attn_dropout=0 or another backend")
    flex_attention, create_block_mask = _flex_fns(q.device.type)
    doc_q = segment_ids(cu_q, total=q.shape[0])
    doc_k = segment_ids(cu_k, total=k.shape[0])

    def same_sample(b, h, qi, ki):
        return doc_q[qi] == doc_k[ki]

    mask = create_block_mask(same_sample, None, None, q.shape[0], k.shape[0], device=q.device)
    out = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask)
    return out[0].transpose(0, 1)


def _rowdot(a: Tensor, b: Tensor, chunk: int = 4096) -> Tensor:
    """Row-wise dot products (N, C), (N, C) -> (N,), in cache-sized chunks (3x faster on CPU)."""
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    for s in range(0, a.shape[0], chunk):
        torch.linalg.vecdot(a[s:s + chunk], b[s:s + chunk], out=out[s:s + chunk])
    return out


class _TokenKeysValues(torch.autograd.Function):
    """Per-token keys and values from per-unit rows, rotated, with a hand-written backward.

    kv_t = bias + scale_t * (table[index_t] + coef_t * direction);  k_t = R(t) kv_t[:Hd];  v_t = kv_t[Hd:]
    (also rotated when ``rotate_values``). Shapes: table (U, 2Hd), per-token (N,), k, v (N, H, d);
    ``direction`` is one (2Hd,) row, or a (U, 2Hd) table read at ``index_t`` (a direction per unit).

    Built from autograd ops, this costs several fresh N x 2Hd buffers (each a round of page faults
    on CPU), zero-filled select gradients and broadcast reductions. Here the forward is one gather
    and in-place updates, and the backward one inverse rotation, a column sum (bias), a chunked
    row-wise dot (scale), a matrix-vector product (direction) and one scatter-add into the table.
    """

    @staticmethod
    def forward(ctx, table, index, coef, direction, scale, bias, rot, heads, rotate_values):
        inner = table.shape[1] // 2
        kv = table.index_select(0, index)
        if coef is not None:  # direction (2Hd,) shared, or (U, 2Hd) per unit (the calcium gain)
            kv.addcmul_(coef[:, None], direction if direction.dim() == 1 else direction.index_select(0, index))
        if scale is not None:
            kv.mul_(scale[:, None])
        if bias is not None:
            kv.add_(bias)
        k = rotate_into(kv[:, :inner].unflatten(-1, (heads, -1)), rot)
        v = kv[:, inner:].unflatten(-1, (heads, -1))
        v = rotate_into(v, rot) if rotate_values else v
        ctx.save_for_backward(index, coef, scale, bias, kv if scale is not None else None, rot)
        ctx.table_rows, ctx.rotate_values, ctx.has_direction = table.shape[0], rotate_values, direction is not None
        ctx.per_unit_direction = direction is not None and direction.dim() == 2
        return k, v

    @staticmethod
    def backward(ctx, dk, dv):
        index, coef, scale, bias, kv, rot = ctx.saved_tensors
        n, heads, d = dk.shape
        inner = heads * d
        back = torch.conj_physical(rot)
        dkv = torch.empty(n, 2 * inner, dtype=dk.dtype, device=dk.device)
        rotate_into(dk, back, out=dkv[:, :inner].unflatten(-1, (heads, d)))
        if ctx.rotate_values:
            rotate_into(dv, back, out=dkv[:, inner:].unflatten(-1, (heads, d)))
        else:
            dkv[:, inner:] = dv.reshape(n, inner)
        d_bias = dkv.sum(0) if bias is not None and ctx.needs_input_grad[5] else None
        d_scale = None
        if scale is not None:
            if ctx.needs_input_grad[4]:  # kv = bias + scale * tok  =>  dL/dscale = dkv . (kv - bias) / scale
                dot = _rowdot(dkv, kv)
                d_scale = (dot - dkv @ bias if bias is not None else dot) / scale
            dkv.mul_(scale[:, None])
        def per_row(x: Tensor) -> Tensor:  # the sum of x over each table row's tokens
            return torch.zeros(ctx.table_rows, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, index, x)

        d_direction = None
        if ctx.has_direction and ctx.needs_input_grad[3]:
            d_direction = per_row(dkv * coef[:, None]) if ctx.per_unit_direction else coef @ dkv
        return per_row(dkv), None, None, d_direction, d_scale, d_bias, None, None, None


def time_prior_offsets(heads: int, dim_head: int, omega: Tensor | None, amplitude: float,
                       min_period_s: float = 0.05) -> Tensor:
    """Initial query/key offsets (H, d) that make attention local in time before anything is learned.

    Adding the same real vector ``a`` to the rotated pairs of every query and key (phase 0) adds
    ``sum_j a_j^2 cos(omega_j (t_k - t_q)) / sqrt(d)`` to every score: a kernel peaked at equal times. With
    ``amplitude`` A per pair (in logits) and the pairs whose period is at least ``min_period_s`` (faster
    ones would only add noise at the scale of stimulus presentations), a latent starts out attending to
    the spikes near its own time instead of to the whole window. The offsets are learned afterwards.
    """
    off = torch.zeros(heads, dim_head)
    if omega is None or amplitude <= 0:
        return off
    period = 2 * torch.pi / omega.clamp_min(1e-12)
    use = (omega > 0) & (period >= min_period_s)
    a = (amplitude * dim_head ** 0.5) ** 0.5
    off[:, 0::2][:, use.to(torch.bool)] = a
    return off


class RotaryCrossAttention(nn.Module):
    """Pre-norm cross-attention with rotary time embedding: queries attend to the packed context
    tokens of their own sample. Returns the residual branch (the caller adds it).

    Keys and values come from ``context`` (any rows, e.g. latents) or ``context_factored`` (input
    tokens given as unit rows + per-token index, the encoders' fast path); both return them rotated.

    Args (keyword-only): dim (D), heads (H), dim_head (d), dropout (attention), rotate_values,
    backend (``varlen_attention`` backend).
    """

    def __init__(self, *, dim: int, heads: int, dim_head: int, dropout: float, rotate_values: bool,
                 backend: str = "auto", time_prior: float = 0.0, omega: Tensor | None = None,
                 calcium_gain: bool = False) -> None:
        super().__init__()
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        self.rotate_values, self.backend = rotate_values, backend
        inner = heads * dim_head
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        # calcium tokens: a per-unit key/value direction scaled by the token's dF/F (context_factored)
        self.to_gain = nn.Linear(dim, 2 * inner, bias=False) if calcium_gain else None
        self.q_time = self.k_time = None
        if time_prior > 0:  # learned query/key offsets, initialised to a time-local kernel (time_prior_offsets)
            off = time_prior_offsets(heads, dim_head, omega, time_prior)
            self.q_time, self.k_time = nn.Parameter(off.clone()), nn.Parameter(off.clone())

    def _k_offset(self, like: Tensor) -> Tensor | None:
        """The key offset laid out like a row of to_kv's output (2Hd,): k part offset, v part 0."""
        if self.k_time is None:
            return None
        return torch.cat([self.k_time.reshape(-1), self.k_time.new_zeros(self.k_time.numel())]).to(like.dtype)

    def context(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
        """Context rows x (..., D) at times ``rope`` (rotations broadcastable to (..., 1, d/2)) ->
        rotated keys, values, each (N, H, d) with N the product of x's leading dims."""
        k, v = self.to_kv(self.norm_kv(x)).unflatten(-1, (2, self.heads, self.dim_head)).unbind(-3)
        if self.k_time is not None:
            k = k + self.k_time.to(k.dtype)
        k = rotate(k, rope)
        v = rotate(v, rope) if self.rotate_values else v
        return k.reshape(-1, self.heads, self.dim_head), v.reshape(-1, self.heads, self.dim_head)

    def context_factored(self, rows: Tensor, index: Tensor, rope: Rope, coef: Tensor | None = None,
                         direction: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Exactly ``context(rows[index] + coef[:, None] * direction, rope)``, with the LayerNorm and the
        projection done once per row of ``rows`` instead of once per token.

        Shapes: rows (U, D) (one per unit), index (N,) into rows, rope (N, 1, d/2) rotations,
        coef (N,) per-token scalar (the calcium value f) or None, direction (D,) (W_f);
        returns rotated keys, values, each (N, H, d).

        With x = a + f c, LayerNorm(x) = g * (a_c + f c_c) / s + beta, where a_c, c_c are a, c minus
        their means and s^2 = (|a_c|^2 + 2 f a_c.c_c + f^2 |c_c|^2) / D + eps; the projection W is
        linear, so W LayerNorm(x) = (W(g a_c) + f W(g c_c)) / s + W beta. W(g a_c) and the three dot
        products are per unit; a token costs one gather and two multiply-adds of width 2*H*d, and the
        backward is a scatter-add into the unit rows (``_TokenKeysValues``).

        With ``calcium_gain`` (``to_gain``) a token also gets ``f * W_g LayerNorm(a) / s``: a direction per
        unit scaled by its dF/F. Added to the unit embedding, f reaches every unit's key and value along
        the same direction W c_c, so a latent averaging tokens sees one weighted mean of dF/F, where a
        linear decoder weighs each ROI's dF/F on its own; the per-unit direction is that weighting (an
        EPhys token's value is its unit's row, counted once per spike: the same form with f = 1).
        """
        ln, w = self.norm_kv, self.to_kv.weight
        a_c = rows - rows.mean(-1, keepdim=True)
        per_unit = F.linear(a_c * ln.weight, w)  # (U, 2Hd)
        bias_out = F.linear(ln.bias, w)  # (2Hd,)
        offset = self._k_offset(bias_out)
        if offset is not None:  # the key offset is added after the LayerNorm, like its bias
            bias_out = bias_out + offset
        dt = per_unit.dtype
        if coef is None:  # spikes: every token of a unit has the same key and value before rotation
            inv_s = torch.rsqrt(a_c.float().pow(2).mean(-1, keepdim=True) + ln.eps).to(dt)
            table, coef, per_value, scale, bias = torch.addcmul(bias_out, per_unit, inv_s), None, None, None, None
        else:
            c_c = direction - direction.mean()
            per_value = F.linear(c_c * ln.weight, w).to(dt)  # (2Hd,)
            if self.to_gain is not None:  # (U, 2Hd): each unit's own dF/F direction
                per_value = per_value + self.to_gain(ln(rows)).to(dt)
            s_aa = a_c.float().pow(2).sum(-1)[index]
            s_ac = (a_c.float() @ c_c.float())[index]
            f = coef.float()
            var = (s_aa + f * (2 * s_ac + f * c_c.float().pow(2).sum())) / rows.shape[-1]
            table, coef, scale, bias = per_unit, f.to(dt), torch.rsqrt(var.clamp_min(0) + ln.eps).to(dt), bias_out.to(dt)
        return _TokenKeysValues.apply(table, index, coef, per_value, scale, bias, rope, self.heads,
                                      self.rotate_values)

    def forward(self, x_q: Tensor, q_rope: Rope, k: Tensor, v: Tensor, *, cu_q: Tensor | None,
                cu_k: Tensor, max_q: int, max_k: int, shared_q: bool = False) -> Tensor:
        """Shapes:
            x_q: (..., D) query rows flattening to Nq in sample order, or (M, D) shared by all samples
                 when ``shared_q``; q_rope: rotations broadcastable to x_q's leading dims + (1, d/2)
            k, v: (Nk, H, d) rotated keys and values from ``context*``, in sample order
            returns (Nq, D), or (S*M, D) when ``shared_q``
        """
        h, d = self.heads, self.dim_head
        q = self.to_q(self.norm_q(x_q)).unflatten(-1, (h, d))
        if self.q_time is not None:
            q = q + self.q_time.to(q.dtype)
        q = rotate(q, q_rope)
        out = varlen_attention(q.reshape(-1, h, d), k, v, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k,
                               shared_q=shared_q, dropout_p=self.dropout if self.training else 0.0,
                               backend=self.backend)  # (Nq, H, d)
        if self.rotate_values:  # values carried R(t_k); bring the mixture back to the query's frame
            out = rotate_back(out.view(-1, *q.shape) if shared_q else out.view(q.shape), q_rope)
        return self.to_out(out.reshape(-1, h * d))


class RotarySelfAttention(nn.Module):
    """Pre-norm self-attention among the latents of each sample, with rotary time embedding.
    Every sample has the same number of latents, so the packed batch is dense (S, M) and one fused
    SDPA call covers it exactly (no padding, no mask). Returns the residual branch.

    Args (keyword-only): dim (D), heads (H), dim_head (d), dropout (attention), rotate_values.
    """

    def __init__(self, *, dim: int, heads: int, dim_head: int, dropout: float, rotate_values: bool,
                 time_prior: float = 0.0, omega: Tensor | None = None) -> None:
        super().__init__()
        self.heads, self.dim_head, self.dropout, self.rotate_values = heads, dim_head, dropout, rotate_values
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)
        self.q_time = self.k_time = None
        if time_prior > 0:
            off = time_prior_offsets(heads, dim_head, omega, time_prior)
            self.q_time, self.k_time = nn.Parameter(off.clone()), nn.Parameter(off.clone())

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        """x (S, M, D); rope (M, 1, d/2) rotations of the latent times -> (S, M, D)."""
        q, k, v = self.to_qkv(self.norm(x)).unflatten(-1, (3, self.heads, self.dim_head)).unbind(2)
        if self.q_time is not None:
            q, k = q + self.q_time.to(q.dtype), k + self.k_time.to(k.dtype)
        q, k = rotate(q, rope), rotate(k, rope)
        v = rotate(v, rope) if self.rotate_values else v
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=self.dropout if self.training else 0.0).transpose(1, 2)
        if self.rotate_values:
            out = rotate_back(out, rope)
        return self.to_out(out.flatten(-2))
