"""One writer per store: a lock object ``_ingest/lock.json`` with its holder and a heartbeat.

    with StoreLock(store, owner="ingest run"):
        ...   # write the store; a heartbeat thread keeps the lock fresh

The lock body is JSON: ``owner``, ``user``, ``host``, ``pid``, ``token`` (random, the holder's
identity), ``started`` and ``heartbeat`` (Unix seconds), ``interval_s`` and ``stale_after_s``.

- Taking it creates the object only if there is none: locally under an ``flock`` on
  ``_ingest/lock.guard`` (held for the few microseconds of each lock operation; the kernel drops it
  when a process dies, so the guard itself never goes stale), on S3 by a conditional PUT
  (``If-None-Match: *``), which S3 applies atomically.
- A second writer is refused with one line naming the holder (``LockHeld``).
- A lock is stale when its heartbeat is older than ``stale_after_s`` (6 heartbeat intervals by
  default: 60 s), or when its host is this host and its pid is not running. A stale lock is taken
  over by replacing exactly the object that was judged stale: locally under the guard, on S3 with
  ``If-Match: <its ETag>``, so of two writers that both find it stale only one wins.
- The heartbeat rewrites the object (guard / ``If-Match`` its current ETag) every ``interval_s``;
  if it finds the lock is no longer its own, the lock is lost and ``check()`` raises ``LockLost``,
  which the writer calls before it publishes its tables. Release deletes the object only if it is
  still its own.

Clocks: staleness by heartbeat age compares the holder's clock with the reader's; hosts are
assumed to agree within a fraction of ``stale_after_s``.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid

from shards.atomic import atomic_path
from shards.store import Store, StoreError, describe_s3_error

LOCK = "_ingest/lock.json"
GUARD = "_ingest/lock.guard"



def _parse(data: bytes) -> dict:
    """A lock body as a dict; unreadable bodies read as {} (a lock whose holder cannot be told: stale by age)."""
    try:
        info = json.loads(data)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}

class LockHeld(StoreError):
    """Another live writer holds the store's lock."""


class LockLost(StoreError):
    """This writer's lock was taken over (its heartbeat stopped long enough to look stale)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def describe_holder(info: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started", 0))))
    age = now - float(info.get("heartbeat", 0))
    return (f"{info.get('owner', '?')} (user {info.get('user', '?')}, host {info.get('host', '?')}, "
            f"pid {info.get('pid', '?')}, since {started}, heartbeat {age:.0f} s ago)")


def _condition_failed(exc: BaseException) -> bool:
    """An S3 conditional write/delete that lost: 412 PreconditionFailed, or 409 ConditionalRequestConflict."""
    for e in (exc, getattr(exc, "__cause__", None)):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            err = resp.get("Error", {})
            if err.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return True
            if resp.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return True
    return isinstance(exc, FileExistsError)


class StoreLock:
    """The store's writer lock (see the module docstring). Use as a context manager, or call
    ``acquire()`` / ``release()``; ``beat()`` is one heartbeat (the thread calls it)."""

    def __init__(self, store: Store | str, owner: str = "ingest run", interval_s: float = 10.0,
                 stale_after_s: float | None = None, key: str = LOCK):
        self.store = Store(store) if isinstance(store, str) else store
        self.owner, self.key = owner, key
        self.interval_s = float(interval_s)
        self.stale_after_s = float(stale_after_s) if stale_after_s is not None else 6 * self.interval_s
        self.token = uuid.uuid4().hex
        self.took_over: dict | None = None  # the stale holder this lock replaced, if any
        self.lost: str | None = None
        self._version = None  # S3: the ETag of our object
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name in some containers
            user = str(os.getuid()) if hasattr(os, "getuid") else "?"
        now = time.time()
        self.info = {"owner": owner, "user": user, "host": socket.gethostname(), "pid": os.getpid(),
                     "token": self.token, "started": now, "heartbeat": now, "interval_s": self.interval_s,
                     "stale_after_s": self.stale_after_s}

    def __repr__(self) -> str:
        return f"StoreLock({self.store.url(self.key)!r}, token={self.token[:8]})"

    # ---- what is stale --------------------------------------------------------------------------
    def stale_reason(self, info: dict, now: float | None = None) -> str | None:
        """Why a lock body no longer protects anyone, or None while its holder is alive."""
        now = time.time() if now is None else now
        try:
            age = now - float(info.get("heartbeat", 0))
        except (TypeError, ValueError):
            return "its heartbeat is unreadable"
        limit = max(self.stale_after_s, float(info.get("stale_after_s") or 0))
        if age > limit:
            return f"its heartbeat is {age:.0f} s old (stale after {limit:.0f} s)"
        pid = info.get("pid")
        if info.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
            return f"its pid {pid} is not running on this host"
        return None

    # ---- public ---------------------------------------------------------------------------------
    def acquire(self) -> StoreLock:
        """Take the lock, or raise LockHeld naming the live holder."""
        for _ in range(5):  # a holder that releases between our create and our read: try again
            self.info["heartbeat"] = time.time()
            if self._create():
                break
            held = self._read()
            if held is None:
                continue
            info, version = held
            why = self.stale_reason(info)
            if why is None:
                raise LockHeld(f"{self.store.uri} is being written by {describe_holder(info)}; wait for it to "
                               f"finish (if that process is gone, the lock goes stale after "
                               f"{self.stale_after_s:.0f} s, or remove {self.store.url(self.key)})")
            if self._replace(version, info.get("token")):
                self.took_over = {**info, "why": why}
                break
        else:
            raise LockHeld(f"{self.store.uri}: could not take the lock {self.store.url(self.key)} (it keeps changing)")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat_loop, name="store-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def beat(self) -> bool:
        """One heartbeat: rewrite our lock with a fresh time; False (and ``lost`` set) if it is not ours."""
        if self.lost:
            return False
        self.info["heartbeat"] = time.time()
        try:
            ok = self._refresh()
        except Exception:  # noqa: BLE001 - a heartbeat that could not be written is tried again next time
            return True
        if not ok:
            held = self._read()
            self.lost = (f"{self.store.uri}: this writer's lock was taken over"
                         + (f" by {describe_holder(held[0])}" if held else "") + "; its output is not published")
        return ok

    def check(self) -> None:
        """Raise LockLost if the lock was taken over (call before publishing)."""
        if self.lost:
            raise LockLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.lost:
            try:
                self._delete()
            except Exception:  # noqa: BLE001 - a lock we cannot delete goes stale on its own
                pass

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.beat() and self.lost:
                return

    # ---- backends -------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return json.dumps(self.info, sort_keys=True).encode()

    def _create(self) -> bool:
        return self._s3_create() if self.store.remote else self._local(self._local_create)

    def _read(self):
        return self._s3_read() if self.store.remote else self._local(self._local_read)

    def _replace(self, version, token) -> bool:
        if self.store.remote:
            return self._s3_put(IfMatch=version)
        return self._local(lambda: self._local_swap(token))

    def _refresh(self) -> bool:
        if self.store.remote:
            return self._version is not None and self._s3_put(IfMatch=self._version)
        return self._local(lambda: self._local_swap(self.token))

    def _delete(self) -> None:
        if self.store.remote:
            self._s3_delete()
        else:
            self._local(self._local_delete)

    # local: every operation under an flock on the guard file
    def _local(self, fn):
        import fcntl

        guard = os.path.join(self.store.root, GUARD)
        os.makedirs(os.path.dirname(guard), exist_ok=True)
        fd = os.open(guard, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fn()
        finally:
            os.close(fd)  # drops the flock

    def _lock_path(self) -> str:
        return os.path.join(self.store.root, self.key)

    def _local_read(self):
        try:
            with open(self._lock_path(), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return _parse(data), None

    def _local_write(self) -> None:
        with atomic_path(self._lock_path(), tag=self.token) as tmp, open(tmp, "wb") as fh:
            fh.write(self._body())

    def _local_create(self) -> bool:
        if os.path.exists(self._lock_path()):
            return False
        self._local_write()
        return True

    def _local_swap(self, token) -> bool:
        """Write our body over the lock if it is still the one with ``token``."""
        held = self._local_read()
        if held is None or held[0].get("token") != token:
            return False
        self._local_write()
        return True

    def _local_delete(self) -> None:
        held = self._local_read()
        if held is not None and held[0].get("token") == self.token:
            os.remove(self._lock_path())

    # S3: conditional requests
    def _s3_where(self) -> tuple[str, str]:
        bucket, _, key = self.store.path(self.key).partition("/")
        return bucket, key

    def _s3_call(self, method: str, **kw):
        bucket, key = self._s3_where()
        try:
            return self.store.fs.call_s3(method, Bucket=bucket, Key=key, **kw)
        except StoreError:
            raise
        except Exception as exc:
            if _condition_failed(exc) or isinstance(exc, FileNotFoundError):
                raise
            err = describe_s3_error(exc, self.store.uri)
            if err is None:
                raise
            raise err from exc

    def _s3_create(self) -> bool:
        return self._s3_put(IfNoneMatch="*")

    def _s3_put(self, **cond) -> bool:
        try:
            resp = self._s3_call("put_object", Body=self._body(), ContentType="application/json", **cond)
        except FileNotFoundError:  # If-Match on a lock that is gone
            return False
        except Exception as exc:
            if _condition_failed(exc):
                return False
            raise
        self._version = resp.get("ETag")
        return True

    def _s3_read(self):
        from fsspec.asyn import sync

        bucket, key = self._s3_where()
        fs = self.store.fs

        async def get():
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await resp["Body"].read(), resp.get("ETag")
            finally:
                resp["Body"].close()

        try:
            data, etag = sync(fs.loop, get)
        except FileNotFoundError:
            return None
        except Exception as exc:
            err = describe_s3_error(exc, self.store.uri)
            if err is None:
                raise
            raise err from exc
        return _parse(data), etag

    def _s3_delete(self) -> None:
        try:
            self._s3_call("delete_object", IfMatch=self._version)
        except FileNotFoundError:
            pass
        except Exception as exc:
            if _condition_failed(exc):
                return  # not ours any more: leave it
            # a server without conditional deletes: delete only what still carries our token
            held = self._s3_read()
            if held is not None and held[0].get("token") == self.token:
                self._s3_call("delete_object")
