"""What a mixture will really deliver, before anyone pays for GPUs (``python -m shards mix``)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np

from shards.stream.dataset import MixtureStream, StreamConfig, over_budget


def mix_report(config: StreamConfig, batches: int, world_size: int = 1, progress: bool = False) -> dict:
    """Requested vs realised fractions per selector over ``batches`` steps of every rank, batches per
    rank, tokens per batch (computed by building every batch, exactly as training would), and the
    corrupt samples skipped while building them (``skipped_samples``, in all and per rank)."""
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
    skipped = [0] * world_size
    total = sum(per_rank)
    with tqdm(total=total, unit="batch", desc="mix", disable=not progress) as bar:
        for r, s in enumerate(streams):
            cache: OrderedDict = OrderedDict()
            for pos in s.positions(plan, 0):
                batch = s.make_batch(plan, pos, 0, cache)
                tokens.append(len(batch["input_unit_index"]))
                skipped[r] += int(batch["n_skipped"])
                if sum(skipped) > s.budget(len(plan)):  # every rank's skips count against one budget
                    raise over_budget(config, sum(skipped), len(plan))
                bar.update(1)
    return {
        "selectors": selectors,
        "batches_per_rank": per_rank,
        "tokens_per_batch": {"mean": float(np.mean(tokens)) if tokens else 0.0, "max": int(max(tokens, default=0))},
        "skipped_samples": sum(skipped),
        "skipped_samples_per_rank": skipped,
        "seed": config.seed,
    }
