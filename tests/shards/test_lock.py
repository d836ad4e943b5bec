"""One writer per store (issue 13.5): a second ingest is refused naming the holder, stale locks are taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from shards.lock import LOCK, LockHeld, LockLost, StoreLock
from shards.store import Store
from tests.support import REAL_FIXTURES, REPO


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(store: Store, **fields) -> None:
    """A lock body as another writer would have left it."""
    now = time.time()
    body = {"owner": "ingest run --src elsewhere", "user": "someone", "host": "other-host", "pid": 4242,
            "token": "f" * 32, "started": now, "heartbeat": now, "interval_s": 10.0, "stale_after_s": 60.0, **fields}
    store.write_bytes(LOCK, json.dumps(body).encode())


def _ingest_cli(src, out):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "ingest", "run", "--src", str(src), "--out", str(out), "--quiet",
                           "--workers", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_second_ingest_is_refused_naming_the_holder_and_touches_nothing(tmp_path):
    out = tmp_path / "store"
    store = Store(str(out))
    first = StoreLock(store, owner="ingest run --src first").acquire()
    try:
        # the first writer's file in progress: the second's .tmp cleanup used to delete it
        (out / ".tmp").mkdir(parents=True)
        (out / ".tmp" / "in-progress").write_bytes(b"half a shard")
        proc = _ingest_cli(REAL_FIXTURES, out)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "ingest run --src first" in lines[0] and f"pid {os.getpid()}" in lines[0]
        assert socket.gethostname() in lines[0]
        assert (out / ".tmp" / "in-progress").read_bytes() == b"half a shard"
        assert not (out / "_ingest" / "failures.json").exists() and not (out / "manifest.parquet").exists()
        with pytest.raises(LockHeld, match="ingest run --src first"):
            StoreLock(store).acquire()  # in this process as well
    finally:
        first.release()
    assert not (out / LOCK).exists()
    with StoreLock(store):  # free again
        assert json.loads((out / LOCK).read_bytes())["pid"] == os.getpid()


def test_stale_locks_are_taken_over_and_live_ones_are_not(tmp_path):
    store = Store(str(tmp_path / "store"))
    _plant(store, host=socket.gethostname(), pid=_dead_pid())  # crashed on this host, heartbeat fresh
    with StoreLock(store) as lock:
        assert "not running" in lock.took_over["why"]
        assert json.loads(store.read_bytes(LOCK))["token"] == lock.token
    _plant(store, heartbeat=time.time() - 3600)  # another host, silent for an hour
    with StoreLock(store) as lock:
        assert "heartbeat" in lock.took_over["why"]
    _plant(store)  # another host, fresh heartbeat: alive as far as we can tell
    with pytest.raises(LockHeld, match="other-host.*pid 4242"):
        StoreLock(store).acquire()
    assert json.loads(store.read_bytes(LOCK))["token"] == "f" * 32  # left as it was


def test_heartbeat_notices_a_takeover_and_the_run_publishes_nothing(tmp_path):
    store = Store(str(tmp_path / "store"))
    lock = StoreLock(store, interval_s=3600).acquire()  # the thread never beats by itself here
    try:
        before = json.loads(store.read_bytes(LOCK))["heartbeat"]
        assert lock.beat() and json.loads(store.read_bytes(LOCK))["heartbeat"] >= before
        _plant(store)  # someone judged us stale and took the lock
        assert not lock.beat()
        with pytest.raises(LockLost, match="taken over by ingest run --src elsewhere"):
            lock.check()
    finally:
        lock.release()
    assert json.loads(store.read_bytes(LOCK))["token"] == "f" * 32  # release leaves the new holder's lock


def test_s3_lock_is_a_conditional_write(s3_bucket):
    import boto3
    import botocore.exceptions

    store = Store(f"s3://{s3_bucket}/store")
    first = StoreLock(store, owner="first").acquire()
    try:
        with pytest.raises(LockHeld, match=f"first .*pid {os.getpid()}"):
            StoreLock(store).acquire()
    finally:
        first.release()
    with pytest.raises(botocore.exceptions.ClientError):
        boto3.client("s3").head_object(Bucket=s3_bucket, Key=f"store/{LOCK}")  # released: gone
    # a stale lock: of two writers that judged the same object stale, only one replaces it
    _plant(store, heartbeat=time.time() - 3600)
    a, b = StoreLock(store), StoreLock(store)
    _, version = a._read()
    assert a._replace(version, None) and not b._replace(version, None)
    assert json.loads(store.read_bytes(LOCK))["token"] == a.token
    assert a.beat()  # a's heartbeat is a conditional write on its own ETag
    b._version = version  # b as the holder that was taken over: its heartbeat finds the lock changed
    assert not b.beat() and b.lost
    a.release()
    _plant(store, heartbeat=time.time() - 3600)
    with StoreLock(store) as lock:
        assert lock.took_over and json.loads(store.read_bytes(LOCK))["token"] == lock.token
    # release is conditional too: a lock someone else holds now is left alone
    lock = StoreLock(store).acquire()
    _plant(store)
    lock.release()
    assert json.loads(store.read_bytes(LOCK))["token"] == "f" * 32
