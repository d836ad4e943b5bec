"""Test-only hooks into the training loop: fault injection and a record of every trained batch.

NOT a user setting: the hooks are off unless the environment variable ``NEUROMIX_TEST_HOOKS`` holds a
JSON object, e.g. ``NEUROMIX_TEST_HOOKS='{"fail_at_step": 5, "record_batches": true}'``, so they never
appear in ``--help``, config.yaml or a TrainConfig. The tests set it around a run (``enabled``) or in a
subprocess's environment. The loop reads it where it runs: in local mode (``--workers 0``) that is the
driver's process; Ray Train workers get the driver's value passed explicitly (``worker_env``: a worker
inherits the environment of the Ray cluster, started before the test set the variable).

    fail_at_step    the last rank exits hard at this step, first attempt only (``inject_failure``)
    stop_at_step    checkpoint and stop at this step, as if preempted (``--resume`` continues)
    record_batches  RUN/batches/rank{r}.jsonl: step, epoch, position and ``batch_digest`` of every batch
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

ENV = "NEUROMIX_TEST_HOOKS"
FAILURE_MARKER = ".injected_failure"  # RUN/.injected_failure: the failure happened (no second one on restart)


@dataclass(frozen=True)
class TestHooks:
    fail_at_step: int | None = None
    stop_at_step: int | None = None
    record_batches: bool = False

    __test__ = False  # not a pytest test class, whatever its name


def from_env() -> TestHooks:
    """The hooks ``NEUROMIX_TEST_HOOKS`` sets (none when it is unset or empty); ValueError on unknown keys."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return TestHooks()
    values = json.loads(text)
    known = {f.name for f in dataclasses.fields(TestHooks)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{ENV}: unknown hook(s) {unknown} (known: {sorted(known)})")
    return TestHooks(**values)


def worker_env() -> dict[str, str]:
    """The env_vars for Ray Train workers' runtime_env: the driver's hooks, or nothing when it has none."""
    text = os.environ.get(ENV, "").strip()
    return {ENV: text} if text else {}


@contextlib.contextmanager
def enabled(**hooks) -> Iterator[None]:
    """Set the hooks for the runs started inside the block (tests), then restore the environment."""
    old = os.environ.get(ENV)
    os.environ[ENV] = json.dumps(dataclasses.asdict(TestHooks(**hooks)))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def inject_failure(hooks: TestHooks, out: str, step: int, rank: int, world: int, say: Callable) -> None:
    """At ``fail_at_step`` the last rank exits hard, on the first attempt only.
    It first waits a few controller polls: Ray Train registers a reported checkpoint when its controller
    collects the report (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a crash right after a report may
    restart from the checkpoint before; the wait makes the test's restart point certain."""
    if hooks.fail_at_step != step or rank != world - 1:
        return
    marker = os.path.join(out, FAILURE_MARKER)
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")))
    say(f"injected failure: rank {rank} exits at step {step}", all_ranks=True)
    os._exit(1)


def batch_digest(batch: dict[str, torch.Tensor]) -> int:
    """A CRC-32 of a batch's contents (tokens, times, labels): equal batches, equal digests."""
    crc = 0
    for k in ("input_unit_index", "input_timestamps", "input_values", "session_index", "output_labels"):
        crc = zlib.crc32(batch[k].numpy().tobytes(), crc)
    return crc


class BatchRecord:
    """RUN/batches/rank{r}.jsonl (``record_batches``): one line per trained batch (step, epoch, position,
    digest), so a test can check that a resumed run sees the batches an uninterrupted one does."""

    def __init__(self, hooks: TestHooks, out: str, rank: int, start_step: int):
        self.fh = None
        self.start_step = start_step
        if hooks.record_batches:
            os.makedirs(os.path.join(out, "batches"), exist_ok=True)
            self.fh = open(os.path.join(out, "batches", f"rank{rank}.jsonl"), "a")

    def add(self, step: int, epoch: int, batch: dict) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps({"step": step, "epoch": epoch, "position": int(batch["position"]),
                                      "digest": batch_digest(batch), "start_step": self.start_step}) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
