"""Index arithmetic of packed batches (docs/batch.md): many samples' tokens or queries laid end to end
and delimited by cumulative offsets ``cu`` (``cu[0] = 0``, ``cu[-1]`` = total), torch only."""

from __future__ import annotations

import torch


def segment_ids(cu: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """The sample each packed row belongs to: ``[0]*n0 + [1]*n1 + ...`` for ``cu = [0, n0, n0+n1, ...]``.

    ``total`` (``cu[-1]``) given spares a device sync when the caller already knows it (a tensor's
    first dimension), which matters inside a compiled or CUDA-graphed step."""
    n = int(cu.numel()) - 1
    counts = torch.diff(cu)
    if total is None:
        total = int(cu[-1])
    return torch.repeat_interleave(torch.arange(n, device=cu.device), counts, output_size=total)
