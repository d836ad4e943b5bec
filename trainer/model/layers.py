"""The building blocks of the network: dropout, the GEGLU feed-forward net, the latent transformer
block and the cross-attention encoder (trainer.model.network assembles them into the model).

Every block is pre-norm and returns either its residual branch (``FeedForward``) or the updated
stream (``LatentBlock``, ``Encoder``); attention rotates queries and keys by their timestamps
(trainer.model.attention, trainer.model.rotary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.model.attention import Rope, RotaryCrossAttention, RotarySelfAttention
from trainer.model.config import ModelConfig
from trainer.model.embeddings import CalciumValueProjection
from trainer.model.packing import segment_ids


def _keep_mask(x: Tensor, p: float) -> tuple[Tensor, float]:
    """Dropout keep mask shaped like x, and the 1/keep-rate scale. The mask comes from 64-bit random
    words split into four 16-bit lanes: a quarter of the random numbers ``bernoulli_`` draws, and
    the drop rate exact to 1/65536."""
    dropped = int(round(p * 65536))
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    keep = (words.view(torch.int16)[:x.numel()] >= dropped - 32768).view(x.shape)
    return keep, 65536.0 / (65536 - dropped)


class _Dropout(torch.autograd.Function):
    """Inverted dropout keeping a 1-byte mask for the backward (CPU: ~4x faster than F.dropout)."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        keep, ctx.scale = _keep_mask(x, p)
        ctx.save_for_backward(keep)
        return torch.mul(x, keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: ``_Dropout`` on CPU, ``F.dropout`` (fused) elsewhere."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return _Dropout.apply(x, p)


class FeedForward(nn.Module):
    """Pre-norm GEGLU feed-forward net; returns the residual branch. (..., D) -> (..., D).

    Args (keyword-only): dim (D), mult (hidden = mult * D), dropout (after the gate).
    """

    def __init__(self, *, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.p = dropout
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * mult * dim)
        self.down = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.up(self.norm(x)).chunk(2, dim=-1)
        return self.down(dropout(h * F.gelu(gate), self.p, self.training))


class LatentBlock(nn.Module):
    """Transformer block on latents: x + drop(SA(x)), then + drop(FFN(x)). (S, M, D) -> (S, M, D).

    Args (keyword-only): config.
    """

    def __init__(self, *, config: ModelConfig, omega: Tensor | None = None) -> None:
        super().__init__()
        c = config
        self.p = c.residual_dropout
        self.attn = RotarySelfAttention(dim=c.dim, heads=c.self_heads, dim_head=c.dim_head,
                                        dropout=c.attn_dropout, rotate_values=c.rotate_values,
                                        time_prior=c.time_prior, omega=omega)
        self.ffn = FeedForward(dim=c.dim, mult=c.ffn_mult, dropout=c.ffn_dropout)

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        x = x + dropout(self.attn(x, rope), self.p, self.training)
        return x + dropout(self.ffn(x), self.p, self.training)


class Encoder(nn.Module):
    """Compresses the tokens of S samples into M latents each (PerceiverIO-style, papers' eq. 1).

    Learned latent queries (``latents_per_step`` vectors repeated at every latent time step)
    cross-attend to the sample's tokens, then a feed-forward net; ``encoder_ca_depth`` such
    cross-attention layers, then ``modality_depth`` self-attention blocks.

    With ``encoder_sinks`` each sample also gets one learned token at every latent time step (one extra
    row of the unit table, values 0). Softmax attention averages the values of the tokens a latent
    attends to, so without it a latent sees *which* units fired near its time but not *how many* spikes:
    one spike of a unit and ten give the same average. A sink at the latent's own time takes a share of
    the attention that falls as the nearby spikes grow in number, so the count reaches the latent. The
    count matters: on the benchmark's held-out EPhys session the ideal observer told only each
    presentation's spike *composition* (a multinomial over units) scores 0.698 / 0.635 / 0.711 on static
    gratings / drifting gratings / natural scenes, against 0.762 / 0.675 / 0.770 with the counts
    (docs/model.md, section 11). POYO's per-unit start and end tokens do this too, at two tokens per
    unit per window (as many as the spikes themselves here); sinks cost one per latent time step.

    Args (keyword-only): config; calcium (True: tokens carry a dF/F value, embedded with W_f).
    """

    def __init__(self, *, config: ModelConfig, calcium: bool, omega: Tensor | None = None) -> None:
        super().__init__()
        c = config
        self.n_steps, self.n_latents, self.per_step = c.n_latent_steps, c.n_latents, c.latents_per_step
        self.sink = nn.Parameter(torch.randn(1, c.dim) * c.emb_init_scale) if c.encoder_sinks else None
        self.latents = nn.Parameter(torch.randn(c.latents_per_step, c.dim) * c.emb_init_scale)
        self.value_proj = CalciumValueProjection(dim=c.dim, init_scale=c.emb_init_scale) if calcium else None
        self.calcium_scale = c.calcium_scale
        self.cross = nn.ModuleList(
            RotaryCrossAttention(dim=c.dim, heads=c.cross_heads, dim_head=c.dim_head, dropout=c.attn_dropout,
                                 rotate_values=c.rotate_values, backend=c.attn_backend,
                                 time_prior=c.time_prior, omega=omega, calcium_gain=calcium and c.calcium_gain)
            for _ in range(c.encoder_ca_depth))
        self.cross_ffn = nn.ModuleList(FeedForward(dim=c.dim, mult=c.ffn_mult, dropout=c.ffn_dropout)
                                       for _ in range(c.encoder_ca_depth))
        self.blocks = nn.ModuleList(LatentBlock(config=c, omega=omega) for _ in range(c.modality_depth))

    def forward(self, *, unit_rows: Tensor, unit_of_token: Tensor, values: Tensor, token_rope: Rope,
                cu: Tensor, max_len: int, latent_rope: Rope) -> Tensor:
        """Shapes:
            unit_rows: (U, D) embeddings of the units present; unit_of_token: (N,) row of each token
            values: (N,) dF/F (ignored by a spike encoder); token_rope: (N, 1, d/2) rotations
            cu: (S+1,) token offsets; max_len: longest sample; latent_rope: (M, 1, d/2) rotations
            returns (S, M, D)
        """
        n_samples, m = cu.numel() - 1, self.n_latents
        if self.sink is not None:
            unit_rows, unit_of_token, values, token_rope, cu = self._with_sinks(
                unit_rows, unit_of_token, values, token_rope, cu, latent_rope)
            max_len += self.n_steps
        coef, direction = (values * self.calcium_scale, self.value_proj.weight) if self.value_proj is not None \
            else (None, None)
        z0 = self.latents.repeat(self.n_steps, 1)  # (M, D): latent j sits at every latent time step
        z = None
        for layer, (attn, ffn) in enumerate(zip(self.cross, self.cross_ffn)):
            # keys/values: LayerNorm + projection once per unit, then per-token gather (exact)
            k, v = attn.context_factored(unit_rows, unit_of_token, token_rope, coef, direction)  # (N, H, d)
            if layer == 0:  # the queries are the same in every sample: computed once
                z = z0 + attn(z0, latent_rope, k, v, cu_q=None, cu_k=cu, max_q=m, max_k=max_len,
                              shared_q=True).view(n_samples, m, -1)
            else:
                cu_q = torch.arange(n_samples + 1, device=cu.device, dtype=cu.dtype) * m
                z = z + attn(z, latent_rope, k, v, cu_q=cu_q, cu_k=cu, max_q=m,
                             max_k=max_len).view(n_samples, m, -1)
            z = z + ffn(z)
        for block in self.blocks:
            z = block(z, latent_rope)
        return z

    def _with_sinks(self, unit_rows: Tensor, unit_of_token: Tensor, values: Tensor, token_rope: Rope, cu: Tensor,
                    latent_rope: Rope) -> tuple[Tensor, Tensor, Tensor, Rope, Tensor]:
        """The packed tokens with ``n_steps`` sink tokens appended to each sample's (at the latent times,
        value 0, unit row ``len(unit_rows)``): rows, per-token row index, values, rotations and offsets."""
        k, n = self.n_steps, unit_of_token.numel()
        n_samples = cu.numel() - 1
        steps = torch.arange(k, device=cu.device)
        new_cu = cu + k * torch.arange(n_samples + 1, device=cu.device, dtype=cu.dtype)
        old_pos = torch.arange(n, device=cu.device) + k * segment_ids(cu, total=n)
        sink_pos = (new_cu[1:, None] - k + steps).reshape(-1)
        total = n + n_samples * k
        index = unit_of_token.new_empty(total)
        index[old_pos], index[sink_pos] = unit_of_token, unit_rows.shape[0]
        vals = values.new_zeros(total)
        vals[old_pos] = values
        rope = token_rope.new_empty((total, *token_rope.shape[1:]))
        rope[old_pos] = token_rope
        rope[sink_pos] = latent_rope[::self.per_step].repeat(n_samples, *([1] * (latent_rope.dim() - 1)))
        rows = torch.cat([unit_rows, self.sink.to(unit_rows.dtype)])
        return rows, index, vals, rope, new_cu
