"""``kill -9`` of a command that started a local Ray cluster takes the whole cluster along
(cluster/lifeline.py), and an ingest task that outlives its driver publishes nothing
(ingest.publish.RunStore).

Each test starts the command as a subprocess, in a session of its own, waits until Ray's workers are
busy (seen in what they write, not by process name), records every process below the command
(walking /proc; a process is its pid and start time, so a reused pid is not mistaken for it), kills
one with SIGKILL and polls until all of them are gone: no speed is asserted, only a bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ingest.publish import NotPublishing, RunStore
from shards import manifest
from shards.lock import LOCK, StoreLock
from tests.support import REPO  # noqa: E402

GONE_WITHIN_S = 60.0  # a bound, not a speed: the measured time is ~0.2 s
WORKERS = 2  # Ray task workers of each ingest run: at most this many publishes can be in flight at a kill

pytestmark = pytest.mark.slow


# ---- processes, by /proc only ------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time in clock ticks) of a pid, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            f = fh.read().rsplit(b")", 1)[1].split()
        return int(f[1]), f[0].decode(), int(f[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> dict[int, tuple[int, int]]:
    """{pid: (ppid, start time)} of every live process below root, root included."""
    table = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := _stat(int(d))) is not None and st[1] not in "ZX":
            table[int(d)] = st
    out, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in table and pid not in out:
            out[pid] = (table[pid][0], table[pid][2])
            frontier += [c for c, st in table.items() if st[0] == pid]
    return out


def alive(procs: dict[int, tuple[int, int]]) -> list[int]:
    """The ones still running: same pid and start time, not a zombie."""
    return [pid for pid, (_, start) in procs.items()
            if (st := _stat(pid)) is not None and st[2] == start and st[1] not in "ZX"]


def wait_gone(procs: dict[int, tuple[int, int]]) -> list[int]:
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def cli(log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``python -m ARGS`` in a session of its own, output to ``log`` (a pipe nobody reads could fill up)."""
    extra = env or {}
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("NEUROMIX_NO_SUPERVISOR", None)
    env.update(extra)
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def published(out: Path) -> dict[str, tuple[int, int]]:
    """What a reader of the store sees: every file but the temp folder and the lock, with size and mtime."""
    res = {}
    for root, _, files in os.walk(out):
        for f in files:
            p = Path(root) / f
            rel = p.relative_to(out).as_posix()
            if rel.startswith(".tmp/") or rel.startswith("_ingest/lock"):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            res[rel] = (st.st_size, st.st_mtime_ns)
    return res


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def kill_and_check(proc: subprocess.Popen, victim: int, driver: int, procs: dict[int, tuple[int, int]], log: Path,
                   out: Path | None = None) -> None:
    """SIGKILL ``victim``; every process in ``procs`` must go, and (``out``) nothing may be published
    after the kill of the driver, or once the driver is dead when the victim is its supervisor (which
    takes the driver along in a moment)."""
    os.kill(victim, signal.SIGKILL)
    if out is not None:
        if victim != driver:
            wait_gone({driver: procs[driver]})
        after_death = published(out)
    left = wait_gone(procs)
    try:
        proc.wait(timeout=5)  # the command (a supervisor whose driver died) has exited too
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert not left, f"still running {GONE_WITHIN_S:.0f} s after the kill: {left}\n{tail(log)}"
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, tail(log))
    if out is not None:
        assert_nothing_published_after(out, after_death)


def assert_nothing_published_after(out: Path, before: dict[str, tuple[int, int]]) -> None:
    """Nothing published after the kill but what was in flight at that instant: a task checks the lock
    (and that its holder is not dying) just before each rename, so a task that passed its check a moment
    before the kill may still land that one rename (seen on a loaded 2-core CI host), one per worker at
    most; nothing already published changes."""
    now = published(out)
    assert {k: v for k, v in now.items() if k in before} == before, "a published file changed after the kill"
    late = sorted(set(now) - set(before))
    assert len(late) <= WORKERS, f"published after the kill: {late}"


# ---- ingest run -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    src = tmp_path_factory.mktemp("death") / "src"
    subprocess.run([sys.executable, "-m", "ingest", "synth", "--out", str(src), "--sessions", "6",
                    "--duration", "120", "--quiet"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return src


def shard_published(out: Path) -> bool:
    """Ray workers are at work: one session's shard is in the store (temp files live for milliseconds,
    too short to be seen by a poll on a loaded host); the corpus has more sessions than workers, so
    the run still has shards to write."""
    return any(out.glob("*ph*/*/*/*.tar"))


def wait_busy(proc: subprocess.Popen, out: Path, log: Path) -> int:
    """Poll until a worker has published a shard while the run still holds the store's lock; the lock holder's
    pid (the driver). Read in the same poll: a run that has already finished (its lock released, the
    process still exiting) must not pass for a busy one."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if shard_published(out):
            with contextlib.suppress(FileNotFoundError, ValueError):
                return json.loads((out / LOCK).read_text())["pid"]
        time.sleep(0.02)
    raise AssertionError(f"no shard was seen published while the run held its lock\n{tail(log)}")


def busy_ingest(corpus: Path, out: Path):
    """`ingest run` started and stopped once a worker has published a shard; (proc, driver pid, processes)."""
    log = out.parent / "ingest.log"
    proc = cli(log, "ingest", "run", "--src", str(corpus), "--out", str(out), "--workers", str(WORKERS), "--quiet")
    driver = wait_busy(proc, out, log)  # the process holding the store's lock
    procs = descendants(proc.pid)
    assert proc.poll() is None, tail(log)
    assert driver in procs
    return proc, driver, procs, log


@pytest.mark.parametrize("victim", ["driver", "command"])
def test_kill_9_takes_the_local_ray_cluster_along_and_nothing_is_published_after(corpus, tmp_path, victim):
    """driver: the process that ran ray.init (and holds the store lock); command: the pid the caller
    started (its supervisor). Either way every process below the command goes, the raylet's
    children (agents, task workers) included, and the store gains nothing after the kill."""
    out = tmp_path / "store"
    proc, driver, procs, log = busy_ingest(corpus, out)
    below_driver = {p for p, (ppid, _) in procs.items() if ppid not in (proc.pid, driver) and p != proc.pid}
    assert below_driver, f"no process below the driver's children: {procs}"  # what used to leak
    assert manifest.MANIFEST not in published(out), "the run finished before it could be killed"
    kill_and_check(proc, driver if victim == "driver" else proc.pid, driver, procs, log, out)
    # the dead run's lock is stale (its pid is gone), so the next run takes it over
    assert StoreLock(str(out)).stale_reason(json.loads((out / LOCK).read_text())) is not None


def test_a_task_whose_run_lost_the_lock_publishes_and_deletes_nothing(tmp_path):
    """RunStore: the check an ingest task makes before each shard, marker or delete."""
    out = tmp_path / "store"
    out.mkdir()
    (out / "old.tar").write_bytes(b"x")
    with StoreLock(str(out), owner="test") as lock:
        store = RunStore(str(out), lock.token)
        store.write_bytes("a.json", b"{}")  # our lock, a live holder: written
        with pytest.raises(NotPublishing, match="taken over"):
            RunStore(str(out), "another-run").write_bytes("b.json", b"{}")
        body = json.loads((out / LOCK).read_text())
        (out / LOCK).write_text(json.dumps({**body, "pid": 2 ** 22 + 1}))  # as if its driver was killed
        with pytest.raises(NotPublishing, match="driver is gone"):
            store.put_file(str(out / "a.json"), "c.json")
        with pytest.raises(NotPublishing):
            store.remove("old.tar")
        (out / LOCK).write_text(json.dumps(body))
    with pytest.raises(NotPublishing, match="released"):  # the run ended: its lock is gone
        store.write_bytes("d.json", b"{}")
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["a.json", "old.tar"]


# ---- trainer.train --------------------------------------------------------------------------------
def test_kill_9_of_the_training_driver_takes_its_ray_cluster_along(tmp_path):
    """`trainer.train --workers 1`: killed once its Ray Train worker trains; every process below
    the command (GCS, raylet, the Train controller and worker, DataLoader processes) goes."""
    from tests.support.storegen import make_store, uneven_records

    store = make_store(str(tmp_path / "store"), uneven_records())
    out = tmp_path / "run"
    log = tmp_path / "train.out"
    proc = cli(log, "trainer.train", "--shards", store.uri, "--out", str(out), "--workers", "1", "--max-steps", "1000",
               "--preset", "small", "--batch-size", "8", "--cpus-per-worker", "1", "--loader-workers", "1",
               "--report-every", "20")
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if any((out / "tb").glob("events.*")):  # rank 0 (a Ray Train worker) has started its loop
            break
        time.sleep(0.1)
    procs = descendants(proc.pid)
    assert proc.poll() is None, tail(log)
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    driver = [p for p, (ppid, _) in procs.items() if ppid == proc.pid]
    assert len(driver) == 1, procs  # the supervisor's one child: the driver
    assert len(procs) > 4, procs
    kill_and_check(proc, driver[0], driver[0], procs, log)


# ---- a driver that joined a running cluster ------------------------------------------------------
def session_members(sid: int, since: float) -> dict[int, tuple[int, int]]:
    """{pid: (ppid, start time)} of live processes in session ``sid`` started after ``since`` (clock ticks
    since boot), so that a reused session id is not taken for it."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as fh:
                f = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(f[3]) == sid and f[0] not in (b"Z", b"X") and int(f[19]) >= since:
            out[int(d)] = (int(f[1]), int(f[19]))
    return out


def _ticks_now() -> float:
    with open("/proc/uptime") as fh:
        return float(fh.read().split()[0]) * os.sysconf("SC_CLK_TCK") - 1


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def _kill_session(sid: int, since: float) -> None:
    for _ in range(100):
        if not (left := session_members(sid, since)):
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@pytest.fixture
def running_cluster():
    """A Ray cluster started with `ray start --head` as the leader of a new session: (address, its
    daemons, (session, since)); killed by that session at the end (never `ray stop`: it stops every Ray
    cluster on the host). Ports of its own (other clusters may run here); a second try when the first
    start fails (GCS deadlines on a loaded 2-core host)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    for _ in range(2):
        port, dashboard, client = _free_ports(3)
        since = _ticks_now()
        start = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
                                  f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                                  "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                                  f"--object-store-memory={200 << 20}"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        text = start.communicate(timeout=240)[0]
        daemons = session_members(start.pid, since)
        if start.returncode == 0 and daemons:
            break
        _kill_session(start.pid, since)
    else:
        pytest.fail(f"ray start failed twice:\n{text[-2000:]}")
    try:
        yield f"127.0.0.1:{port}", daemons, (start.pid, since)
    finally:
        _kill_session(start.pid, since)


def test_a_driver_that_joined_a_cluster_takes_only_its_own_work_along(corpus, tmp_path, running_cluster):
    """RAY_ADDRESS names a running cluster: kill -9 of the driver ends the command, its tasks on the
    cluster end (Ray drops a dead driver's job), the cluster's own processes all live on, and the store
    gains nothing after the kill."""
    address, daemons, (sid, since) = running_cluster
    out = tmp_path / "store"
    log = tmp_path / "ingest.log"
    proc = cli(log, "ingest", "run", "--src", str(corpus), "--out", str(out), "--workers", str(WORKERS), "--quiet",
               env={"RAY_ADDRESS": address})
    driver = wait_busy(proc, out, log)
    mine = descendants(proc.pid)
    assert proc.poll() is None, tail(log)
    job = {p: v for p, v in session_members(sid, since).items() if p not in daemons}  # started for this run
    assert job, "no cluster process was started for the run"
    assert driver in mine and not set(mine) & set(daemons)
    assert manifest.MANIFEST not in published(out), "the run finished before it could be killed"
    os.kill(driver, signal.SIGKILL)
    after_kill = published(out)
    assert not wait_gone(mine), tail(log)
    assert not wait_gone(job), "the dead driver's tasks still run on the cluster"
    assert_nothing_published_after(out, after_kill)
    assert not [p for p in daemons if p not in alive(daemons)], "a process of the cluster was killed"
    proc.wait(timeout=5)
