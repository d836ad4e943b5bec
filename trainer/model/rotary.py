"""Rotary time embedding with continuous timestamps (POYO+ App. C.1).

``R(t)`` is block-diagonal with ``dim_head / 2`` planar rotations of coordinate pairs (2j, 2j+1) by
``2 pi t / T_j``, the periods ``T_j`` log-spaced from ``t_min`` (0.1 ms) to ``t_max`` (4 s). Rotating
queries by their time and keys by theirs makes every attention score depend on the time difference
only: ``(R(t_q) q)^T (R(t_k) k) = q^T R(t_k - t_q) k``.

A rotation is stored as the unit complex numbers ``exp(i 2 pi t / T_j)``, shape (N, 1, dim_head/2)
(the 1 broadcasts over heads), computed once per forward pass for the input tokens, the latents and
the output queries, and reused by every attention block. Rotating a float32 head is then one
complex multiplication per pair (a single vectorised pass: ~4x faster on CPU than the four
multiply-adds of the cos/sin form, which remains for bf16/fp16 tensors, e.g. under CUDA autocast).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def log_spaced_periods(n: int, t_min: float, t_max: float) -> Tensor:
    """``n`` periods (seconds) log-spaced from ``t_min`` to ``t_max`` inclusive. Shape (n,), float64."""
    if not 0 < t_min < t_max:
        raise ValueError(f"need 0 < t_min < t_max, got {t_min}, {t_max}")
    if n == 1:
        return torch.tensor([t_min], dtype=torch.float64)
    return torch.logspace(math.log10(t_min), math.log10(t_max), n, dtype=torch.float64)


class RotaryTimeEmbedding(nn.Module):
    """Maps timestamps to the rotations that ``rotate`` applies.

    Args (keyword-only):
        dim_head: width of one attention head (even).
        t_min, t_max: shortest and longest period in seconds.
        rotate_frac: share of the head's coordinate pairs that rotate (the first ones); the others
            get frequency 0, i.e. are left as they are, so part of every query/key is matched by
            content alone (unit identity, latent identity) whatever the time difference.
            torch_brain rotates half of each head; 1.0 rotates all of it (the papers' eq. C.1).
    """

    def __init__(self, *, dim_head: int, t_min: float, t_max: float, rotate_frac: float = 1.0) -> None:
        super().__init__()
        if dim_head % 2:
            raise ValueError("dim_head must be even")
        if not 0.0 < rotate_frac <= 1.0:
            raise ValueError(f"rotate_frac must be in (0, 1], got {rotate_frac}")
        pairs = dim_head // 2
        n_rot = max(1, int(round(pairs * rotate_frac)))
        # derived from the config: neither learned nor in the state dict, and a plain attribute so
        # that model.to(dtype) cannot round it
        self._cycles_per_s = torch.zeros(pairs, dtype=torch.float64)  # float64; 0 = not rotated
        self._cycles_per_s[:n_rot] = 1.0 / log_spaced_periods(n_rot, t_min, t_max)
        self._cycles_on: dict[torch.device, Tensor] = {}

    @property
    def omega(self) -> Tensor:
        """Angular frequencies 2 pi / T_j (rad/s), float64, shape (dim_head/2,)."""
        return 2 * math.pi * self._cycles_per_s

    def forward(self, timestamps: Tensor) -> Tensor:
        """timestamps (N,) seconds -> rotations exp(i 2 pi t / T_j), complex64 (N, 1, dim_head/2).

        Angles reach 2 pi t / 0.1 ms ~ 6e4 rad in a 1 s window, where float32 keeps only ~4e-3 rad:
        the phase is formed and reduced to [0, 1) cycle in float64, then stored as float32."""
        cycles_per_s = self._cycles_on.get(timestamps.device)
        if cycles_per_s is None:
            cycles_per_s = self._cycles_on[timestamps.device] = self._cycles_per_s.to(timestamps.device)
        with torch.autocast(device_type=timestamps.device.type, enabled=False):
            cycles = timestamps.double()[:, None, None] * cycles_per_s
            angles = (cycles - cycles.floor()).float().mul_(2 * math.pi)
            return torch.polar(torch.ones_like(angles), angles)


def _as_complex(x: Tensor) -> Tensor | None:
    """(..., d) real -> (..., d/2) complex view of the (2j, 2j+1) pairs, or None if not viewable."""
    if x.dtype not in (torch.float32, torch.float64):
        return None
    try:
        return torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    except RuntimeError:  # strides or offset not pair-aligned
        return None


def rotate_into(x: Tensor, rot: Tensor, out: Tensor | None = None) -> Tensor:
    """R(t) x without autograd, written into ``out`` (a fresh contiguous tensor when None).
    x (..., d) real; rot complex, broadcastable to x's (..., d/2)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    xc, oc = _as_complex(x), _as_complex(out)
    if xc is not None and oc is not None:
        torch.mul(xc, rot.to(xc.dtype), out=oc)
        return out
    cos, sin = rot.real.to(x.dtype), rot.imag.to(x.dtype)
    x1, x2, o1, o2 = x[..., 0::2], x[..., 1::2], out[..., 0::2], out[..., 1::2]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    return out


class _Rotate(torch.autograd.Function):
    """y = R(t) x; the backward is the inverse rotation R(-t) g, so only the rotation is saved."""

    @staticmethod
    def forward(ctx, x: Tensor, rot: Tensor) -> Tensor:
        ctx.save_for_backward(rot)
        return rotate_into(x, rot)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rot,) = ctx.saved_tensors
        return rotate_into(grad, torch.conj_physical(rot)), None


def rotate(x: Tensor, rot: Tensor) -> Tensor:
    """Apply R(t) to heads: x (..., N, H, d) real, rot (N, 1, d/2) complex (broadcast over leading
    dims and heads). Returns a new contiguous tensor shaped like x."""
    return _Rotate.apply(x, rot)


def rotate_back(x: Tensor, rot: Tensor) -> Tensor:
    """Apply R(-t) (undo ``rotate``): used on attention outputs when values were rotated."""
    return _Rotate.apply(x, torch.conj_physical(rot))
