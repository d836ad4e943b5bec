"""How a DataLoader worker hands batches to the main process: groups of batches in one buffer.

Handing an item from a worker to the main process costs about a millisecond whatever its size
(each tensor through its own shared-memory file, each item through a pickled message), as much as
building half a batch. So a worker sends ``batches_per_transfer`` consecutive batches as one
contiguous uint8 tensor plus a small layout (``to_wire``), and the main process cuts each array
from one typed view of it (``from_wire``). ``transfer_groups`` says which batches travel together;
``clean_worker_errors`` gives the stream's own errors back their one-line message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator

import numpy as np
import torch


def transfer_groups(n: int, k: int, n_workers: int) -> list[range]:
    """Consecutive batch ranges handed over as one item each; group i goes to worker i % n_workers,
    and the DataLoader reads workers round-robin, so items arrive in batch order whatever the sizes.

    Sizes ramp up 1, 2, 4, ... to k (one group of each size per worker): a group is delivered only
    when all its batches are built, so starting with k would make the first batch wait for k
    batches' worth of reads (256 windows from S3 at k=8, batch 32)."""
    out, start, size = [], 0, 1
    while start < n:
        for _ in range(n_workers):
            if start >= n:
                break
            out.append(range(start, min(start + size, n)))
            start += size
        size = min(2 * size, k)
    return out


def to_wire(batches: list[dict[str, np.ndarray]]) -> dict:
    """Several batches' arrays in one contiguous uint8 tensor plus a small layout.

    A DataLoader worker hands each tensor over through its own shared-memory file, and each
    item through a pickled message: one buffer per group of batches pays that once. The layout
    holds ``(batch, key, dtype, shape, offset in elements of dtype)``, with every array 8-byte
    aligned, so the receiver cuts each array from one typed view of the buffer."""
    layout, offset, parts = [], 0, []
    for i, arrays in enumerate(batches):
        for key, v in arrays.items():
            v = np.asarray(v)
            if not v.flags.c_contiguous:
                v = v.copy()  # (not ascontiguousarray: it turns 0-d scalars into shape (1,))
            offset = -(-offset // 8) * 8  # 8-byte aligned, so every dtype views in place
            layout.append((i, key, v.dtype.str, v.shape, offset // v.dtype.itemsize))
            parts.append((offset, v))
            offset += v.nbytes
    offset = -(-offset // 8) * 8
    # (a buffer allocated in shared memory up front saves the copy the hand-over makes, yet
    # measured slower with 2 workers on 2 cores: fresh shared pages fault on every item)
    wire = torch.empty(offset, dtype=torch.uint8)
    buf = wire.numpy()
    for off, v in parts:
        buf[off:off + v.nbytes] = v.reshape(-1).view(np.uint8)
    return {"wire": wire, "layout": layout, "n": len(batches)}


_TORCH_DTYPES = {np.dtype(t).str: getattr(torch, np.dtype(t).name)
                 for t in ("int8", "uint8", "int16", "int32", "int64", "float16", "float32", "float64", "bool")}


def from_wire(item: dict) -> list[dict[str, torch.Tensor]]:
    """The batches of a wire item, as views into its one buffer (no copy); an in-process batch
    (no ``wire`` key) as is.

    Runs in the main process for every batch, where each microsecond is taken from the
    workers' core: one typed view of the whole buffer per dtype, then a slice per array."""
    if "wire" not in item:
        return [item]
    buf = item["wire"]
    typed: dict[str, torch.Tensor] = {}
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(item["n"])]
    for i, key, dtype, shape, start in item["layout"]:
        view = typed.get(dtype)
        if view is None:
            view = typed[dtype] = buf.view(_TORCH_DTYPES[dtype])
        if len(shape) == 1:
            out[i][key] = view[start:start + shape[0]]
        elif not shape:
            out[i][key] = view[start]
        else:
            out[i][key] = view[start:start + math.prod(shape)].view(shape)
    return out


def clean_worker_errors(items: Iterable, errors: tuple[type[BaseException], ...]) -> Iterator:
    """The items, re-raising ``errors`` with their own message.

    The DataLoader re-raises a worker's exception with the worker's whole traceback as its
    message; the stream's own errors (``errors``) are one line to the user, so give them back
    their own message."""
    try:
        yield from items
    except errors as exc:
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        m = re.match(r"^[\w.]*?(\w+): (.*)$", last)
        msg = m.group(2) if m and m.group(1) == type(exc).__name__ else last
        raise type(exc)(msg) from None
