"""Publishing only while the run holds the store's lock.

A task publishes (a shard, a marker) or deletes only while its run holds the store's lock and the
lock's holder is alive (``RunStore``): a task orphaned by a killed driver, or by a run whose lock was
taken over, writes nothing more.
"""

from __future__ import annotations

import json
import signal
import socket

from shards.lock import LOCK, StoreLock
from shards.store import Store, StoreError


class NotPublishing(StoreError):
    """This task's run no longer holds the store's lock: it publishes and deletes nothing."""


def _dying(pid: int) -> bool:
    """Whether a local process has been killed but not yet torn down: a SIGKILL pending (the kernel
    queues it on every thread as ``kill`` returns) or its main thread exiting (PF_EXITING). A big
    driver takes tens of ms from ``kill -9`` to zombie (measured 18-70 ms), long enough for a worker
    to publish a few shards if only the pid were checked."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            pending = [int(line.split()[1], 16) for line in fh if line.startswith(("SigPnd:", "ShdPnd:"))]
        with open(f"/proc/{pid}/stat", "rb") as fh:
            flags = int(fh.read().rsplit(b")", 1)[1].split()[6])
    except (OSError, ValueError, IndexError):
        return False  # gone (pid_alive says so), or no /proc: the pid check alone
    return any(p & (1 << (signal.SIGKILL - 1)) for p in pending) or bool(flags & 0x4)  # PF_EXITING


class RunStore(Store):
    """The store as one run's task sees it: each publish (``put_file``, ``write_bytes``) and delete
    first checks that the lock (``shards/lock.py``) still carries this run's token and that its holder
    is alive (its pid, on its host, and not being killed; its heartbeat, anywhere), else raises
    NotPublishing. So a task that outlives its driver (``kill -9``) or whose run lost the lock
    publishes nothing more. One read of a small object per shard."""

    def __init__(self, uri: str, token: str):
        super().__init__(uri)
        self.token = token
        self._judge = StoreLock(self)  # only its stale_reason: never acquired

    def check_run(self) -> None:
        try:
            info = json.loads(self.read_bytes(LOCK))
        except FileNotFoundError:
            info = None
        except ValueError:
            info = {}
        if not isinstance(info, dict) or info.get("token") != self.token:
            raise NotPublishing(f"{self.url(LOCK)}: this run's lock was released or taken over; publishing nothing")
        why = self._judge.stale_reason(info)
        pid = info.get("pid")
        if why is None and info.get("host") == socket.gethostname() and isinstance(pid, int) and _dying(pid):
            why = f"its pid {pid} was killed"
        if why:
            raise NotPublishing(f"{self.url(LOCK)}: this run's driver is gone ({why}); publishing nothing")

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.check_run()
        super().write_bytes(rel, data)

    def put_file(self, local_path: str, rel: str) -> None:
        self.check_run()
        super().put_file(local_path, rel)

    def remove(self, rel: str, source: str | None = None) -> None:
        self.check_run()
        super().remove(rel, source)
