"""Learned lookup tables: units, sessions, tasks, and the calcium value projection.

Units and sessions are global vocabularies (row = index in the store's ``units.parquet`` /
``sessions.parquet``, docs/batch.md). Finetuning on new recordings grows them with ``grow``: the
old rows are kept bit for bit, new rows are initialised like the originals, and the indices of the
new rows are returned. Growing replaces the Parameter, so build the optimizer after growing.

A calcium token of unit u with value f is embedded as ``x = u + W_f f`` (POYO+ writes the
concatenation ``[u, W_f f]``; a concatenation followed by the linear key/value maps equals a sum of
two linear terms, and the sum keeps spike and calcium tokens the same width D in one vocabulary).
W_f has no bias: each unit's own vector already absorbs one. A spike token is ``x = u``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GrowableEmbedding(nn.Module):
    """A (num, dim) table, N(0, init_scale) initialised, that can grow without touching old rows.

    Args (keyword-only): num (rows), dim (width), init_scale (std of the initial rows).
    """

    def __init__(self, *, num: int, dim: int, init_scale: float = 0.02) -> None:
        super().__init__()
        self.init_scale = init_scale
        self.weight = nn.Parameter(torch.randn(num, dim) * init_scale)

    def __len__(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, index: Tensor) -> Tensor:
        """index (...) int64 -> (..., dim)."""
        return self.weight[index]

    @torch.no_grad()
    def grow(self, n_new: int) -> Tensor:
        """Append ``n_new`` freshly initialised rows; returns their indices (n_new,)."""
        old = self.weight
        new = torch.randn(n_new, old.shape[1], device=old.device, dtype=old.dtype) * self.init_scale
        self.weight = nn.Parameter(torch.cat([old.detach(), new]), requires_grad=old.requires_grad)
        return torch.arange(old.shape[0], old.shape[0] + n_new, device=old.device)


class CalciumValueProjection(nn.Module):
    """W_f in R^D: maps a dF/F value to a D-vector added to its unit's embedding.

    Args (keyword-only): dim (D), init_scale (std of W_f).
    """

    def __init__(self, *, dim: int, init_scale: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * init_scale)

    def forward(self, unit_rows: Tensor, values: Tensor) -> Tensor:
        """unit_rows (N, D), values (N,) -> token embeddings (N, D). (The encoder uses the factored
        form in ``RotaryCrossAttention.context_factored``; this is the direct definition.)"""
        return unit_rows + values[:, None].to(unit_rows.dtype) * self.weight
