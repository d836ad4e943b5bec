"""A worker's bookkeeping between steps: its log lines, the step-rate and data-wait timer, the driver's
Ctrl-C, and gathering a value from every rank.

Everything here works the same with one rank and with many: collectives fall back to the local value
without torch.distributed, and only rank 0 writes the log.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from trainer.tally import Tally


class RunLog:
    """Progress lines: rank 0 prints them (Ray forwards to the driver) and appends them to RUN/train.log."""

    def __init__(self, out: str, rank: int):
        self.path, self.rank = os.path.join(out, "train.log"), rank

    def __call__(self, msg: str, all_ranks: bool = False) -> None:
        if self.rank != 0 and not all_ranks:
            return
        line = f"[rank {self.rank}] {msg}" if all_ranks else msg
        print(line, file=sys.__stdout__ or sys.stdout, flush=True)  # not Ray Train's print patch (it tees)
        with open(self.path, "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {line}\n")


def gather(obj: Any) -> list:
    """obj of every rank, in rank order (a collective; [obj] without torch.distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


#: The loss's terms besides the tasks' that a step's output may carry, logged as ``train/{name}`` (their mean over the
#: steps that had them): the likelihood readout's fit, the count loss, a finetuning's row prior. A fixed list, so every
#: rank reduces the same tensor whichever terms its own batches had.
LOSS_TERMS = ("likelihood_nll", "count_nll", "row_prior")


class Timer:
    """Data-wait and step-rate bookkeeping between two log lines (reports/validation excluded)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.t0 = time.perf_counter()
        self.wait = self.skip = 0.0
        self.steps = 0
        self.loss_sum: Any = 0.0
        self.last_loss = math.nan
        # (sum, steps) per term, on the device the steps' terms are on (no sync per step)
        self.terms = torch.zeros(len(LOSS_TERMS), 2, dtype=torch.float64, device=device)

    def timed(self, iterable):
        """Yield from iterable, adding the time blocked in next() to self.wait."""
        it = iter(iterable)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            self.steps += 1
            yield item

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Time spent in the block (checkpoints, validation) counts in no rate."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.skip += time.perf_counter() - t

    def add_loss(self, loss: torch.Tensor, out: dict | None = None) -> None:
        """Sum the step's loss (on a GPU as a tensor: no sync per step), and the terms of ``LOSS_TERMS`` that the
        step's output ``out`` holds."""
        self.loss_sum += float(loss.detach()) if loss.device.type == "cpu" else loss.detach()
        for i, name in enumerate(LOSS_TERMS):
            if out is not None and name in out:
                self.terms[i, 0] += out[name].detach().double()
                self.terms[i, 1] += 1

    def summary(self, tally: Tally, optimizer, device) -> dict[str, float]:
        """Scalars since the last call, summed (counts) or averaged (rates) over ranks; then reset."""
        wall = max(time.perf_counter() - self.t0 - self.skip, 1e-9)
        tally.all_reduce()
        x = torch.tensor([float(self.loss_sum), self.steps, self.wait, wall], dtype=torch.float64,
                         device=tally.sums.device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            dist.all_reduce(x)
        loss_sum, steps, wait, wall = x.tolist()
        steps_per_rank, wall_per_rank = steps / world, wall / world
        out = tally.scalars("train")
        self.last_loss = loss_sum / max(steps, 1)
        out.update({
            "train/loss": self.last_loss,
            "train/lr": optimizer.param_groups[0]["lr"],
            "perf/steps_per_s": steps_per_rank / wall_per_rank,
            "perf/samples_per_s": tally.samples / wall_per_rank,
            "perf/tokens_per_s": tally.tokens / wall_per_rank,
            "perf/data_wait_fraction": wait / wall,
        })
        terms = self.terms
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(terms)
        for name, (total, n) in zip(LOSS_TERMS, terms.tolist()):
            if n > 0:
                out[f"train/{name}"] = total / n
        self.terms = torch.zeros_like(self.terms)
        if device.type == "cuda":
            out["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            out["perf/gpu_mem_reserved_gb"] = torch.cuda.memory_reserved(device) / 1e9
        self.t0, self.wait, self.skip, self.steps, self.loss_sum = time.perf_counter(), 0.0, 0.0, 0, 0.0
        return out


class Interrupt:
    """Has the driver asked to stop (Ctrl-C: it creates RUN/.interrupt)? One stat per step; with several
    ranks they agree by an all-reduce every log_every steps (and when ``now``), so all stop at one step."""

    def __init__(self, path: str, world: int, every: int, device: torch.device):
        self.path, self.world, self.every, self.device = path, world, every, device
        self.seen = False

    def requested(self, step: int, now: bool = False) -> bool:
        if self.world == 1:
            self.seen = self.seen or os.path.exists(self.path)
        elif now or step % self.every == 0:
            flag = torch.tensor([float(os.path.exists(self.path))], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.seen = self.seen or bool(flag.item())
        return self.seen
