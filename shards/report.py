"""What a mixture will really deliver, before anyone pays for GPUs (``python -m shards mix``)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np

from .stream import MixtureStream, StreamConfig


def mix_report(config: StreamConfig, batches: int, world_size: int = 1, progress: bool = False) -> dict:
    """Requested vs realised fractions per selector over ``batches`` steps of every rank, batches per
    rank, and tokens per batch (computed by building every batch, exactly as training would)."""
    from tqdm import tqdm

    config = replace(config, epoch_windows=batches * world_size * config.batch_size)
    streams = [MixtureStream(config, rank=r, world_size=world_size) for r in range(world_size)]
    plan = streams[0].plan()
    per_rank = [len(s.positions(plan, 0)) for s in streams]
    used = np.concatenate([s.positions(plan, 0).reshape(-1) for s in streams])
    counts = np.bincount(plan.selector[used], minlength=len(streams[0].selectors))
    selectors = {
        sel.name: {"requested": round(sel.weight, 6), "realised": round(int(counts[i]) / max(1, len(used)), 6),
                   "windows": int(counts[i])}
        for i, sel in enumerate(streams[0].selectors)
    }
    tokens = []
    total = sum(per_rank)
    with tqdm(total=total, unit="batch", desc="mix", disable=not progress) as bar:
        for s in streams:
            cache: OrderedDict = OrderedDict()
            for pos in s.positions(plan, 0):
                tokens.append(len(s.make_batch(plan, pos, 0, cache)["input_unit_index"]))
                bar.update(1)
    return {
        "selectors": selectors,
        "batches_per_rank": per_rank,
        "tokens_per_batch": {"mean": float(np.mean(tokens)) if tokens else 0.0, "max": int(max(tokens, default=0))},
        "seed": config.seed,
    }
