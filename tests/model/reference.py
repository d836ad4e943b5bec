"""An independent recomputation of the model with padded (B, L) tensors, to check the packed path.

Boolean key masks instead of ``cu_seqlens``, per-token LayerNorm and projections instead of the
factored per-unit ones, and the papers' 2x2-block rotation instead of trainer.model.rotary."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.model.network import MultiModalPOYO


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


