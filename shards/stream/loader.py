"""``StreamLoader``: the DataLoader over a ``MixtureStream`` that owns the resumable state.

The state is the epoch and the number of global windows consumed (by batches the training loop
actually received), plus the corrupt-sample count. Resuming on another world size or worker count
continues the same global order (``shards.stream.plan.rank_positions``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

import torch
from torch.utils.data import DataLoader

from shards.stream.dataset import CorruptSampleError, MixtureStream, over_budget
from shards.stream.fetch import FetchError, StoreUnavailable
from shards.stream.plan import n_batches
from shards.stream.wire import clean_worker_errors, from_wire

log = logging.getLogger(__name__)

# the stream's own errors: one line to the user, also when a DataLoader worker raised them
_WORKER_ERRORS = (StoreUnavailable, FetchError, CorruptSampleError)


@dataclass
class StreamState:
    epoch: int = 0
    consumed_windows: int = 0  # global windows of this epoch already delivered to training
    skipped: int = 0
    seed: int = 0
    mix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class StreamLoader:
    """DataLoader over a MixtureStream that knows how far training got (for checkpoints).

    Each epoch is its own DataLoader (the epoch's plan is forked into its workers), and
    starting workers costs a few tenths of a second before the first batch: at the end of
    a short epoch the trainer would wait for it every time (10% of the steps of the demo's
    4-s epochs). So the next epoch's workers are started before this epoch ends
    (``prestart``), when at most ``max(4 * batches_per_transfer * num_workers, n // 4)``
    of the epoch's n batches remain; they fill their prefetch queue and wait. The next
    ``iter()`` takes them over if the state still points at the start of that epoch."""

    def __init__(self, stream: MixtureStream, num_workers: int = 2, pin_memory: bool | None = None,
                 prestart: bool = True):
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prestart = prestart and num_workers > 0
        self.state = StreamState(seed=stream.config.seed, mix=stream.config.mix)
        self._next: tuple[tuple[int, int], object] | None = None  # ((epoch, start window), started iterator)
        self.prestarted_epochs = 0  # epochs that began on workers started ahead (tests, logs)

    def __len__(self) -> int:
        return self.stream.batches_per_rank(self.state.epoch, self.state.consumed_windows)

    def _start(self, epoch: int, start_window: int, skipped: int = 0):
        """An iterator over one epoch from start_window; with workers, they fork (and start) now."""
        s = self.stream
        s.epoch, s.start_window, s.start_skipped = epoch, start_window, skipped
        loader = DataLoader(s, batch_size=None, num_workers=self.num_workers, pin_memory=False,
                            prefetch_factor=2 if self.num_workers else None,
                            persistent_workers=False, multiprocessing_context="fork" if self.num_workers else None)
        return iter(loader)

    def __iter__(self):
        s = self.stream
        epoch, start = self.state.epoch, self.state.consumed_windows
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == (epoch, start):
            it = ahead[1]
            self.prestarted_epochs += 1
        else:
            del ahead  # a stale head start (the state was loaded since): its workers exit
            it = self._start(epoch, start, self.state.skipped)
        s.epoch, s.start_window, s.start_skipped = epoch, start, self.state.skipped
        n_epoch = len(s.plan())
        step = s.world_size * s.config.batch_size
        remaining = n_batches(n_epoch, s.world_size, s.config.batch_size, start)  # without planning the epoch again
        lead = max(4 * s.config.batches_per_transfer * self.num_workers, remaining // 4)
        budget = s.budget(n_epoch)
        for item in clean_worker_errors(it, _WORKER_ERRORS):
            for batch in from_wire(item):
                self.state.consumed_windows += step
                self.state.skipped += int(batch["n_skipped"])
                if self.state.skipped > budget:  # the sum over workers (each also checks its own, per sample)
                    raise over_budget(s.config, self.state.skipped, n_epoch)
                remaining -= 1
                if self.prestart and self._next is None and remaining <= lead:
                    self._next = ((epoch + 1, 0), self._start(epoch + 1, 0))
                    s.epoch, s.start_window, s.start_skipped = epoch, start, self.state.skipped
                if self.pin_memory:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                yield batch
        self.state = replace(self.state, epoch=self.state.epoch + 1, consumed_windows=0, skipped=0)

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.state.seed) != self.state.seed or state.get("mix", self.state.mix) != self.state.mix:
            log.warning("resuming a stream with another seed or mixture: the global order changes")
        self.state = StreamState(**{k: state[k] for k in StreamState.__dataclass_fields__ if k in state})
        self._next = None  # workers started for the old position: let them go
