"""Fetch samples (chunks) by byte range, in a planned order, from a local store or S3.

    from shards.stream.fetch import ChunkFetcher, FetchError
    with ChunkFetcher(store) as f:
        f.prefetch(items)                  # (path, offset, length) in the order they will be read
        for path, offset, length in items:
            blob = f.get(path, offset, length)   # == store.read_range(path, offset, offset + length)

Local stores are read directly with ``os.pread`` on a small cache of open file descriptors;
``prefetch`` is a no-op there (the page cache and kernel readahead already do that job, and a
copy through another cache would only cost). Nothing else below applies to local stores.

S3: one ranged GET per chunk. ``prefetch`` keeps a read-ahead window: at most ``prefetch_depth``
planned items past the last one ``get`` returned are issued to ``threads`` background threads,
and only while the bytes they pin fit in ``cache_bytes``. ``get`` may skip planned items (the
window slides past them: the items planned before the one asked for count as passed), read
passed items late (within ``prefetch_depth`` gets: out of order, the window stays put) or ask for
unplanned ones (fetched on the spot); ``prefetch`` may be called again to append to the plan. It
pulls ``items`` lazily, so a generator over a whole epoch costs only the window's memory. What
the consumer has not reached yet is pinned; everything else is evicted least recently used once
the cache would pass ``cache_bytes`` (a hard cap, ``stats['max_cache_bytes']`` shows the peak).

**The cache is in memory, not on disk**, because: its job is read-ahead for an order known in
advance plus reuse of a chunk whose windows the plan puts close together (a few hundred chunks of
a few hundred KB), not a second copy of the dataset; memory leaves nothing behind when a process
is killed (an on-disk cache needs per-process directories, atomic writes and sweeping of dead
processes' directories, and a pid in a directory name is not unique across containers sharing a
cache root); and a disk cache would add a write and a read to every chunk. The cost is RSS: every
process (DataLoader worker) holds up to its own ``cache_bytes``, so size it per worker: e.g.
``prefetch_depth`` x chunk size x a few.

Retries, S3 only (one attempt = one HTTP request: the fetcher owns a private s3fs instance with
the store's options, s3fs ``retries = 1`` and botocore ``total_max_attempts = 1``, so neither
retries underneath us; left alone they nest to 25 requests over 47 s for a lasting 503 and 250
requests over 209 s for a lasting drop, at s3fs 2026.9. Two things remain underneath: s3fs still
sleeps 0.1 s after a failed attempt, and aiohttp resends a GET once, silently, when a kept-alive
connection closes without answering (RFC 9112 9.3.1), so an attempt is at most two requests). Up to ``retries`` attempts with full-jitter exponential backoff
(``uniform(0, min(max_backoff_s, backoff_s * 2**k))``) on:

- HTTP 5xx, 429 and the S3 codes SlowDown, ServiceUnavailable, InternalError, RequestTimeout,
  Throttling (s3fs 2026.9 raises ``OSError(EBUSY)`` for SlowDown/503, ``OSError(EREMOTEIO)`` for
  InternalError, ``TimeoutError`` for RequestTimeout, each with the botocore ``ClientError`` as
  ``__cause__``; the code is read from that ``ClientError``);
- connections dropped or reset (``botocore ConnectionClosedError`` from aiohttp
  ``ServerDisconnectedError``), timeouts (``botocore ReadTimeoutError`` / ``ConnectTimeoutError``
  from aiohttp ``SocketTimeoutError``), a body cut short (aiohttp ``ClientPayloadError``, raised
  as is), other ``OSError`` / ``ConnectionError`` / ``asyncio.TimeoutError``;
- a body shorter than asked for.

Not retried (``FetchError`` at once, naming the store URL and path): other 4xx such as NoSuchKey
(s3fs: ``FileNotFoundError``), AccessDenied/403 (``PermissionError``), InvalidRange.

Giving up: once the attempts are spent, or once ``give_up_s`` have passed since the first attempt
began (no attempt starts later than that), ``get`` raises ``StoreUnavailable`` (a ``FetchError``),
one line naming the endpoint, the object and the attempts: ``S3 endpoint http://host:port
unreachable after 8 attempts over 5.3 s reading s3://bucket/prefix/x.tar bytes a-b; last error:
...``. That is a network failure, never data corruption: the stream does not count it as a corrupt
sample (it stops). Bound on the time one ``get`` spends on a dead endpoint: the backoff sleeps
(at most ``sum(min(max_backoff_s, backoff_s * 2**k) for k < retries - 1)``: 5.15 s with the
defaults) plus the attempts themselves, each at most ``timeout_s`` (connect and read) plus the
0.1 s s3fs sleeps after a failure, and never more than ``give_up_s + timeout_s + 0.1`` s in all.
With the defaults (8 attempts, 0.05 s doubling to 2 s, 30 s timeouts, ``give_up_s`` 60): an
endpoint that refuses connections (server down) is given up on within 6 s; one that does not
answer at all (packets dropped) within 90.1 s. A body that is still short when the attempts are
spent (the object ends before the range: a truncated shard, bad bytes) raises ``TruncatedShard``
(a ``FetchError``) instead, as does a local file that ends early.

Processes: a fetcher holds only its configuration until first used; threads, the s3fs client,
the cache and file descriptors are created on first use *in the process using it*, and are
created afresh when a forked child uses a fetcher its parent used. So it pickles, and is safe in
``torch.utils.data.DataLoader`` workers (fork or spawn) -- but each worker then has its own
threads and cache: create or first use the fetcher inside the worker (e.g. in the dataset's
``__iter__``), never start its threads in the parent before the workers fork. Threads are
daemons and stop on ``close()`` or when the fetcher is garbage collected.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import os
import random
import threading
import time
import weakref
from typing import Iterable

from shards.store import Store

__all__ = ["ChunkFetcher", "FetchError", "StoreUnavailable", "TruncatedShard", "is_retryable"]

Key = tuple  # (path, offset, length)

RETRY_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                         "ThrottlingException", "TooManyRequests"})
_PERMANENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_FD_CACHE = 64

_INIT_LOCK = threading.Lock()


def _reset_init_lock() -> None:
    global _INIT_LOCK
    _INIT_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_init_lock)


class FetchError(IOError):
    """A chunk could not be fetched: a permanent error, or transient ones ``retries`` times."""


class StoreUnavailable(FetchError):
    """The S3 endpoint did not serve a chunk within the retry policy (network errors, timeouts,
    5xx/SlowDown): an outage, not corruption. ``endpoint``, ``url`` (the object), ``attempts``,
    ``elapsed_s`` and ``last`` (the last error) say what happened."""

    def __init__(self, message: str = "", *, endpoint: str = "", url: str = "", attempts: int = 0,
                 elapsed_s: float = 0.0, last: str = ""):
        super().__init__(message)
        self.endpoint, self.url, self.attempts, self.elapsed_s, self.last = endpoint, url, attempts, elapsed_s, last


class TruncatedShard(FetchError):
    """The object ends before the chunk's byte range: the store's bytes are bad (counted as a corrupt
    sample by the stream), not the network."""


def _again(e: BaseException) -> FetchError:
    """A fresh exception of the same kind for another waiter of a failed fetch (a FetchError keeps its
    class and attributes; anything else becomes a FetchError)."""
    if isinstance(e, FetchError):
        import copy

        return copy.copy(e)
    return FetchError(str(e))


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _client_error(e: BaseException):
    try:
        from botocore.exceptions import ClientError
    except ImportError:  # pragma: no cover - s3fs always brings botocore
        return None
    return next((x for x in _chain(e) if isinstance(x, ClientError)), None)


def is_retryable(e: BaseException) -> bool:
    """Whether an error of one ranged GET is worth another attempt (see the module docstring)."""
    ce = _client_error(e)
    if ce is not None:
        err = ce.response.get("Error", {}) or {}
        status = int((ce.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
        code = str(err.get("Code", ""))
        return code in RETRY_CODES or status >= 500 or status == 429 or code.isdigit() and int(code) >= 500
    if isinstance(e, FetchError) or isinstance(e, _PERMANENT_OS):
        return False
    retryable: tuple = (OSError, ConnectionError, TimeoutError, asyncio.TimeoutError, http.client.HTTPException)
    try:
        from botocore.exceptions import (ConnectionError as BotoConnectionError, HTTPClientError,
                                         IncompleteReadError, ResponseStreamingError)
        retryable += (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import aiohttp
        retryable += (aiohttp.ClientError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        from fsspec.exceptions import FSTimeoutError
        retryable += (FSTimeoutError,)
    except ImportError:  # pragma: no cover
        pass
    return isinstance(e, retryable)


def _describe(e: BaseException) -> str:
    ce = _client_error(e)
    if ce is not None:
        err = ce.response.get("Error", {}) or {}
        status = (ce.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
        return f"{err.get('Code', '?')} (HTTP {status}): {err.get('Message', '')}".rstrip(": ")
    return f"{type(e).__name__}: {e}"


class _Pending:
    """A fetch in flight; other gets of the same chunk wait on it."""

    __slots__ = ("done", "data", "error")

    def __init__(self):
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class _Runtime:
    """Everything a fetcher creates on first use in one process: locks, threads, cache, clients."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.store: Store = cfg["store"]
        self.pid = os.getpid()
        self.remote = self.store.remote
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.closed = False
        self.stop = threading.Event()
        self.rng = random.Random()
        self.counters = dict(hits=0, misses=0, bytes_fetched=0, retries=0, evictions=0, cache_bytes=0,
                             max_cache_bytes=0, prefetched=0)
        # local: path -> [fd, users, evicted]
        self.fds: collections.OrderedDict[str, list] = collections.OrderedDict()
        # S3
        self._fs = None
        self.threads: list[threading.Thread] = []
        self.cache: collections.OrderedDict[Key, bytes] = collections.OrderedDict()
        self.inflight: dict[Key, _Pending] = {}
        self.plan_iters: collections.deque = collections.deque()
        self.plan_error: BaseException | None = None
        self.window: collections.deque = collections.deque()  # [key, pinned] pulled, not yet passed
        self.issued = 0  # window[:issued] were handed to the prefetch threads (or found cached)
        self.where: dict[Key, int] = collections.defaultdict(int)  # key -> occurrences in window
        self.pins: dict[Key, int] = {}  # key -> pinned occurrences in window
        self.gets = 0
        self.passed: collections.deque = collections.deque()  # (gets, key) popped unread, recently
        self.passed_count: dict[Key, int] = {}
        self.pinned_bytes = 0

    # ---- S3 client -----------------------------------------------------------------------------
    @property
    def fs(self):
        """A private s3fs instance with the store's options, retrying nothing by itself."""
        if self._fs is None:
            base = self.store.fs
            opts = dict(getattr(base, "storage_options", {}) or {})
            cfg = dict(opts.get("config_kwargs") or {})
            timeout = self.cfg["timeout_s"]
            cfg.update(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=timeout,
                       read_timeout=timeout, max_pool_connections=max(10, 2 * self.cfg["threads"]))
            opts.update(config_kwargs=cfg, skip_instance_cache=True, use_listings_cache=False)
            fs = type(base)(**opts)
            fs.retries = 1  # s3fs' own loop (class attribute, not an __init__ argument at 2026.9)
            self._fs = fs
        return self._fs

    # ---- fetching ------------------------------------------------------------------------------
    def fetch_remote(self, key: Key) -> bytes:
        path, offset, length = key
        url = self.store.url(path)
        where = f"{url} bytes {offset}-{offset + length}"
        if length == 0:
            return b""
        last, short = "no attempt", False
        attempts = max(1, self.cfg["retries"])
        t0 = time.monotonic()
        made = 0
        for attempt in range(attempts):
            if attempt:
                cap = min(self.cfg["max_backoff_s"], self.cfg["backoff_s"] * 2 ** (attempt - 1))
                if self.stop.wait(self.rng.uniform(0.0, cap)):
                    break
                if time.monotonic() - t0 > self.cfg["give_up_s"]:
                    break  # no attempt starts later than give_up_s after the first
                with self.lock:
                    self.counters["retries"] += 1
            if self.stop.is_set():
                break
            made += 1
            try:
                data = self.fs.cat_file(self.store.path(path), start=offset, end=offset + length)
            except Exception as e:  # noqa: BLE001 - classified right here
                if not is_retryable(e):
                    raise FetchError(f"{where}: {_describe(e)} (not retried)") from e
                last, short = _describe(e), False
                continue
            if len(data) == length:
                with self.lock:
                    self.counters["bytes_fetched"] += length
                return data
            last, short = f"short body: {len(data)} of {length} bytes", True
        if self.stop.is_set():
            raise FetchError(f"{where}: fetcher closed")
        elapsed = time.monotonic() - t0
        if short:
            raise TruncatedShard(f"{where}: the object ends early ({last}, {made} attempts)")
        raise StoreUnavailable(f"S3 endpoint {self.endpoint} unreachable after {made} attempt{'s' * (made != 1)} "
                               f"over {elapsed:.1f} s "
                               f"reading {where}; last error: {last}", endpoint=self.endpoint, url=url,
                               attempts=made, elapsed_s=elapsed, last=last)

    @property
    def endpoint(self) -> str:
        from shards.store import s3_endpoint

        opts = getattr(self.store.fs, "storage_options", {}) or {}
        return (opts.get("client_kwargs") or {}).get("endpoint_url") or s3_endpoint()

    def read_local(self, key: Key) -> bytes:
        path, offset, length = key
        full = self.store.path(path)
        with self.lock:
            entry = self.fds.get(full)
            if entry is None:
                try:
                    fd = os.open(full, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as e:
                    raise FetchError(f"{full}: {e.strerror or e}") from e
                entry = self.fds[full] = [fd, 0, False]
                while len(self.fds) > _FD_CACHE:
                    _, old = self.fds.popitem(last=False)
                    old[2] = True
                    if old[1] == 0:
                        os.close(old[0])
            else:
                self.fds.move_to_end(full)
            entry[1] += 1
        try:
            parts, got = [], 0
            while got < length:
                b = os.pread(entry[0], length - got, offset + got)
                if not b:
                    break
                parts.append(b)
                got += len(b)
        finally:
            with self.lock:
                entry[1] -= 1
                if entry[2] and entry[1] == 0:
                    os.close(entry[0])
        if got != length:
            raise TruncatedShard(f"{full} bytes {offset}-{offset + length}: file ends after {got} of {length} bytes")
        with self.lock:
            self.counters["misses"] += 1
            self.counters["bytes_fetched"] += length
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # ---- the plan window (all *_locked: caller holds self.lock) ---------------------------------
    def pull_locked(self) -> None:
        depth = max(1, self.cfg["prefetch_depth"])
        while len(self.window) < depth and self.plan_iters:
            try:
                path, offset, length = next(self.plan_iters[0])
                key = (str(path), int(offset), int(length))
            except StopIteration:
                self.plan_iters.popleft()
                continue
            except Exception as e:  # a broken plan iterator: drop it, report it on the next get
                self.plan_iters.popleft()
                self.plan_error = e
                continue
            self.window.append([key, False])
            self.where[key] += 1

    def _pin_locked(self, key: Key) -> None:
        n = self.pins.get(key, 0)
        if n == 0:
            self.pinned_bytes += key[2]
        self.pins[key] = n + 1

    def _unpin_locked(self, key: Key) -> None:
        n = self.pins[key] - 1
        if n == 0:
            del self.pins[key]
            self.pinned_bytes -= key[2]
        else:
            self.pins[key] = n

    def consume_locked(self, key: Key) -> None:
        """The consumer reached ``key``: pass every window item up to its first occurrence.

        Items passed unread are remembered for ``prefetch_depth`` gets: a get of one of them is a
        read out of order (e.g. a batch read in another order than it was planned), which must not
        jump the window to a later occurrence of the same chunk."""
        self.gets += 1
        if self.passed_count.get(key):
            for i, (_, k) in enumerate(self.passed):
                if k == key:
                    del self.passed[i]
                    break
            self._drop_passed_locked(key)
        elif self.where.get(key):
            while self.window:
                k, pinned = self.window.popleft()
                self.issued = max(0, self.issued - 1)
                self.where[k] -= 1
                if not self.where[k]:
                    del self.where[k]
                if pinned:
                    self._unpin_locked(k)
                if k == key:
                    break
                self.passed.append((self.gets, k))
                self.passed_count[k] = self.passed_count.get(k, 0) + 1
        horizon = self.gets - max(1, self.cfg["prefetch_depth"])
        while self.passed and self.passed[0][0] <= horizon:
            self._drop_passed_locked(self.passed.popleft()[1])

    def _drop_passed_locked(self, key: Key) -> None:
        n = self.passed_count[key] - 1
        if n:
            self.passed_count[key] = n
        else:
            del self.passed_count[key]

    def next_job_locked(self):
        """The next planned chunk to fetch in the background, or None (nothing that fits now)."""
        self.pull_locked()
        cap = self.cfg["cache_bytes"]
        while self.issued < len(self.window):
            item = self.window[self.issued]
            key = item[0]
            if key not in self.pins:
                if key[2] > cap:  # can never be cached: get() fetches it when asked
                    self.issued += 1
                    continue
                if self.pinned_bytes + key[2] > cap:
                    return None
            self.issued += 1
            item[1] = True
            self._pin_locked(key)
            if key in self.cache or key in self.inflight:
                continue
            pending = self.inflight[key] = _Pending()
            self.counters["prefetched"] += 1
            return key, pending
        return None

    def insert_locked(self, key: Key, data: bytes) -> None:
        n = len(data)
        cap = self.cfg["cache_bytes"]
        if key in self.cache or n > cap:
            return
        while self.counters["cache_bytes"] + n > cap:
            victim = next((k for k in self.cache if k not in self.pins), None)
            if victim is None:
                return  # only pinned chunks left: do not cache this one
            self.counters["cache_bytes"] -= len(self.cache.pop(victim))
            self.counters["evictions"] += 1
        self.cache[key] = data
        self.counters["cache_bytes"] += n
        self.counters["max_cache_bytes"] = max(self.counters["max_cache_bytes"], self.counters["cache_bytes"])

    def finish(self, key: Key, pending: _Pending, data: bytes | None, error: BaseException | None) -> None:
        with self.cond:
            if data is not None and not self.closed:
                self.insert_locked(key, data)
            self.inflight.pop(key, None)
            pending.data, pending.error = data, error
            pending.done.set()
            self.cond.notify_all()

    def fetch_into(self, key: Key, pending: _Pending) -> None:
        try:
            data = self.fetch_remote(key)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on this chunk
            self.finish(key, pending, None, e)
            if not isinstance(e, Exception):
                raise
        else:
            self.finish(key, pending, data, None)

    # ---- threads -------------------------------------------------------------------------------
    def start_threads_locked(self) -> None:
        if self.threads or self.closed:
            return
        for i in range(max(1, self.cfg["threads"])):
            t = threading.Thread(target=self.worker, name=f"chunk-fetch-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def worker(self) -> None:
        while True:
            with self.cond:
                job = None
                while not self.closed:
                    job = self.next_job_locked()
                    if job is not None:
                        break
                    self.cond.wait()
                if job is None:
                    return
            self.fetch_into(*job)

    def close(self) -> None:
        if os.getpid() != self.pid:
            return  # a forked child's copy: its threads and locks belong to the parent
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.stop.set()
            self.cond.notify_all()
            threads = list(self.threads)
        deadline = time.monotonic() + 5.0  # idle threads return at once; a GET in flight ends by its timeout
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        with self.cond:
            for pending in list(self.inflight.values()):
                if not pending.done.is_set():
                    pending.error = FetchError(f"{self.store.uri}: fetcher closed")
                    pending.done.set()
            self.inflight.clear()
            self.cache.clear()
            self.counters["cache_bytes"] = 0
            self.window.clear()
            self.plan_iters.clear()
            self.where.clear()
            self.passed.clear()
            self.passed_count.clear()
            self.pins.clear()
            self.pinned_bytes = 0
            for entry in self.fds.values():
                entry[2] = True  # closed by the last reader still using it
                if entry[1] == 0:
                    os.close(entry[0])
            self.fds.clear()
        self._fs = None


class ChunkFetcher:
    """Byte-range reads of a store's chunks with S3 read-ahead, an LRU byte-capped memory cache
    and bounded retries. See the module docstring for the design; all methods are thread safe."""

    def __init__(self, store: Store | str, *, cache_bytes: int = 1 << 30, threads: int = 8,
                 prefetch_depth: int = 64, retries: int = 8, backoff_s: float = 0.05,
                 max_backoff_s: float = 2.0, timeout_s: float = 30.0, give_up_s: float = 60.0):
        store = Store(store) if isinstance(store, str) else store
        self._cfg = dict(store=store, cache_bytes=int(cache_bytes), threads=int(threads),
                         prefetch_depth=int(prefetch_depth), retries=int(retries), backoff_s=float(backoff_s),
                         max_backoff_s=float(max_backoff_s), timeout_s=float(timeout_s), give_up_s=float(give_up_s))
        self._closed = False
        self._rt_obj: _Runtime | None = None
        self._finalizer = None

    @property
    def store(self) -> Store:
        return self._cfg["store"]

    def __repr__(self) -> str:
        return f"ChunkFetcher({self.store.uri!r})"

    # pickling carries the configuration only (e.g. to spawned DataLoader workers)
    def __getstate__(self) -> dict:
        return {"_cfg": self._cfg, "_closed": self._closed}

    def __setstate__(self, state: dict) -> None:
        self._cfg, self._closed = state["_cfg"], state["_closed"]
        self._rt_obj, self._finalizer = None, None

    def _rt(self) -> _Runtime:
        rt = self._rt_obj
        if rt is not None and rt.pid == os.getpid():
            return rt
        with _INIT_LOCK:
            rt = self._rt_obj
            if rt is None or rt.pid != os.getpid():
                if self._closed:
                    raise FetchError(f"{self!r} is closed")
                if self._finalizer is not None:
                    self._finalizer.detach()  # the parent's runtime, copied by fork: never touched here
                rt = _Runtime(self._cfg)
                self._finalizer = weakref.finalize(self, rt.close)
                self._rt_obj = rt
            return rt

    # ---- API -----------------------------------------------------------------------------------
    def prefetch(self, items: Iterable) -> None:
        """Plan reads: ``(path, offset, length)`` items in the order ``get`` will ask for them.
        Returns at once; pulled lazily. A no-op for local stores."""
        if self._closed:
            raise FetchError(f"{self!r} is closed")
        rt = self._rt()
        if not rt.remote:
            return
        with rt.cond:
            rt.plan_iters.append(iter(items))
            rt.pull_locked()
            if rt.plan_error is not None:  # e.g. an item that is not (path, offset, length)
                e, rt.plan_error = rt.plan_error, None
                raise e
            rt.start_threads_locked()
            rt.cond.notify_all()

    def get(self, path: str, offset: int, length: int) -> bytes:
        """The bytes ``[offset, offset + length)`` of ``path``; blocks until they are here."""
        if self._closed:
            raise FetchError(f"{self!r} is closed")
        rt = self._rt()
        key = (str(path), int(offset), int(length))
        if key[1] < 0 or key[2] < 0:
            raise ValueError(f"bad byte range {key}")
        if not rt.remote:
            return rt.read_local(key)
        with rt.cond:
            rt.pull_locked()
            if rt.plan_error is not None:
                e, rt.plan_error = rt.plan_error, None
                raise FetchError(f"the prefetch plan failed: {_describe(e)}") from e
            rt.consume_locked(key)
            rt.cond.notify_all()  # the window moved: the prefetch threads may issue more
            data = rt.cache.get(key)
            if data is not None:
                rt.cache.move_to_end(key)
                rt.counters["hits"] += 1
                return data
            pending = rt.inflight.get(key)
            mine = pending is None
            if mine:
                pending = rt.inflight[key] = _Pending()
                rt.counters["misses"] += 1
            else:
                rt.counters["hits"] += 1
        if mine:
            rt.fetch_into(key, pending)
        else:
            pending.done.wait()
        if pending.error is not None:
            e = pending.error
            raise _again(e) from e
        return pending.data

    @property
    def stats(self) -> dict:
        """hits, misses, bytes_fetched, retries, evictions, cache_bytes (now), max_cache_bytes
        (peak), prefetched (chunks issued to the background threads)."""
        rt = self._rt_obj
        if rt is None or rt.pid != os.getpid():
            return dict(hits=0, misses=0, bytes_fetched=0, retries=0, evictions=0, cache_bytes=0,
                        max_cache_bytes=0, prefetched=0)
        with rt.lock:
            return dict(rt.counters)

    @property
    def threads_alive(self) -> int:
        """Background threads running in this process (0 before the first prefetch and after close)."""
        rt = self._rt_obj
        if rt is None or rt.pid != os.getpid():
            return 0
        return sum(t.is_alive() for t in rt.threads)

    def close(self) -> None:
        """Stop the threads, drop the cache and open files. Idempotent; later calls raise."""
        self._closed = True
        rt = self._rt_obj
        if rt is not None and rt.pid == os.getpid():
            if self._finalizer is not None:
                self._finalizer()  # runs rt.close once
            else:
                rt.close()

    def __enter__(self) -> "ChunkFetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
