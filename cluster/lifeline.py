"""The local Ray cluster a command starts dies with the command, even on ``kill -9``.

    if __name__ == "__main__":
        from cluster.lifeline import supervise
        supervise()        # returns in the driver; the supervisor exits with the driver's status
        ...                # the command (ray.init, work)

Why: ``ray.init(address="local")`` starts GCS, raylet, monitor and dashboard as children of the driver
with ``PR_SET_PDEATHSIG`` (Ray's kernel fate sharing), so those die with it; but the raylet's
children (DashboardAgent, RuntimeEnvAgent, the task workers) do not: on a ``kill -9`` of the driver
they are reparented to PID 1 and live on, and a worker in the middle of a task finishes it and
publishes its output (measured with ray 2.60: agents still alive after 40 s, workers for as long as
their task runs). Ray 2.x has no option for that (``kill_child_processes_on_worker_exit`` is about a
worker's own children, and ``ray.init`` has no "own the whole cluster" switch), so:

``supervise()`` forks once, before anything else runs:

- the **supervisor** (the parent, the pid the caller started and sees) is a child subreaper
  (``PR_SET_CHILD_SUBREAPER``): whatever is orphaned below it is reparented to it, not to PID 1. It
  forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT to the driver and waits. When the driver is gone (it ended,
  or was killed by any signal), it SIGKILLs every process left below it and in the driver's session,
  until none is left, and exits with the driver's status (dying of the same signal).
- the **driver** (the child, which returns from ``supervise()`` and runs the command) starts a new
  session (so that a ``kill -9`` of the caller's whole process group reaches only the supervisor),
  and holds the read end of a pipe whose write end only the supervisor holds: when the supervisor
  dies, even of SIGKILL, a thread sees end-of-file, SIGKILLs every other process of the driver's
  session (everything Ray started locally: Ray's workers make their own process groups but stay in
  the session) and exits the driver at once.

A driver that joins an existing cluster (``RAY_ADDRESS``) starts no local Ray processes, so nothing
of that cluster is below it or in its session: only the driver itself goes, and the cluster drops the
dead driver's tasks as it does for any driver.

Linux only (``prctl``); elsewhere, and with ``NEUROMIX_NO_SUPERVISOR=1`` (a debugger, say),
``supervise()`` does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
ENV_DISABLE = "NEUROMIX_NO_SUPERVISOR"


def _prctl(option: int, arg: int) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, sid, state) of a pid, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return int(fields[1]), int(fields[3]), fields[0].decode()
    except (OSError, IndexError, ValueError):
        return None


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _targets(parent: int | None, sid: int | None, spare: set[int]) -> list[int]:
    """Live processes whose parent is ``parent`` or whose session is ``sid``, except ``spare``."""
    out = []
    for pid in _pids():
        if pid in spare:
            continue
        st = _stat(pid)
        if st is None or st[2] in ("Z", "X"):
            continue
        if (parent is not None and st[0] == parent) or (sid is not None and st[1] == sid):
            out.append(pid)
    return out


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _reap_others(driver: int) -> None:
    """Reap the exited children except the driver (its zombie keeps its pid, and so the session id
    we kill by, from being reused until we are done)."""
    me = os.getpid()
    for pid in _pids():
        st = _stat(pid)
        if pid != driver and st is not None and st[0] == me and st[2] in ("Z", "X"):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _supervise_driver(driver: int, lifeline_w: int, timeout_s: float = 30.0) -> None:
    """The supervisor's whole life: forward signals, wait for the driver, kill what is left, exit."""

    def forward(signum, _frame):
        try:
            os.kill(driver, signum)
        except ProcessLookupError:
            pass

    for s in FORWARDED:
        signal.signal(s, forward)
    while True:  # wait for the driver without reaping it; reap orphans that exit meanwhile
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        if info is not None and info.si_pid == driver:
            break
        if info is not None:
            try:
                os.waitpid(info.si_pid, 0)
            except ChildProcessError:
                pass
    for s in FORWARDED:
        signal.signal(s, signal.SIG_IGN)  # cleaning up: not to be interrupted
    me, deadline = os.getpid(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = _targets(me, driver, {driver, me})
        if not left:
            break
        _kill(left)
        time.sleep(0.02)
        _reap_others(driver)
    _, status = os.waitpid(driver, 0)
    os.close(lifeline_w)
    while True:  # the orphans we killed: reap them all
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break
    sys.stdout.flush()
    sys.stderr.flush()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL):
            if sig != signal.SIGKILL:
                signal.signal(sig, signal.SIG_DFL)
            os.kill(me, sig)  # the caller sees the driver's death by that signal (a shell prints "Killed")
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _watch_lifeline(fd: int) -> None:
    """In the driver: when the supervisor dies, kill everything this driver's session holds, then the
    driver itself."""
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    me = os.getpid()
    for _ in range(200):  # a raylet that forks while we kill: its new child is in the session too
        left = _targets(me, me, {me})
        if not left:
            break
        _kill(left)
        time.sleep(0.01)
    os._exit(128 + signal.SIGKILL)


def supervise() -> None:
    """Fork the supervisor; return in the driver (see the module docstring). Call it first thing in a
    command's ``__main__``, while the process has one thread."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV_DISABLE):
        return
    if not _prctl(PR_SET_CHILD_SUBREAPER, 1):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid:  # the supervisor
        os.close(r)
        try:
            _supervise_driver(pid, w)
        except BaseException:  # noqa: BLE001 - a bug here: say so; the driver sees the pipe close
            import traceback

            traceback.print_exc()
        os._exit(1)  # not reached when all went well
    # the driver
    os.close(w)  # (the subreaper flag is not inherited by a fork)
    os.setsid()
    threading.Thread(target=_watch_lifeline, args=(r,), name="lifeline", daemon=True).start()
