"""Everything a fetcher creates on first use in one process: the lock, threads, cache, window, clients.

One lock (with a condition for the background threads) guards the cache, the window, the fetches in
flight and the counters. A chunk is fetched once however many readers want it: the first one (a
reader or a read-ahead thread) fetches it, the others wait on its ``Pending``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable

from shards.stream.fetch.cache import ByteCache
from shards.stream.fetch.config import FetchConfig, FetchStats, Key
from shards.stream.fetch.local import LocalFiles
from shards.stream.fetch.remote import RemoteReader
from shards.stream.fetch.retry import FetchError, again, describe
from shards.stream.fetch.window import ReadAhead


class Pending:
    """A fetch in flight; other gets of the same chunk wait on it."""

    __slots__ = ("done", "data", "error")

    def __init__(self):
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class Runtime:
    def __init__(self, cfg: FetchConfig):
        self.cfg = cfg
        self.store = cfg.store
        self.pid = os.getpid()
        self.remote = self.store.remote
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.closed = False
        self.stop = threading.Event()
        self.stats = FetchStats()
        self.local = LocalFiles(self.store, self.lock, self.stats)
        self.s3 = RemoteReader(cfg, self.stop, self.lock, self.stats)
        self.threads: list[threading.Thread] = []
        self.cache = ByteCache(cfg.cache_bytes, self.stats)
        self.window = ReadAhead(cfg.prefetch_depth)
        self.inflight: dict[Key, Pending] = {}

    # ---- the API's S3 side ---------------------------------------------------------------------
    def plan(self, items: Iterable) -> None:
        """Append planned reads to the window and wake the threads (starting them on first use)."""
        with self.cond:
            self.window.add(items)
            self.window.pull()
            e = self.window.take_error()
            if e is not None:  # e.g. an item that is not (path, offset, length)
                raise e
            self.start_threads_locked()
            self.cond.notify_all()

    def get(self, key: Key) -> bytes:
        """The bytes of ``key`` from S3: cached, in flight (wait for it) or fetched now."""
        with self.cond:
            self.window.pull()
            e = self.window.take_error()
            if e is not None:
                raise FetchError(f"the prefetch plan failed: {describe(e)}") from e
            self.window.consume(key)
            self.cond.notify_all()  # the window moved: the prefetch threads may issue more
            data = self.cache.get(key)
            if data is not None:
                self.stats.hits += 1
                return data
            pending = self.inflight.get(key)
            mine = pending is None
            if mine:
                pending = self.inflight[key] = Pending()
                self.stats.misses += 1
            else:
                self.stats.hits += 1
        if mine:
            self.fetch_into(key, pending)
        else:
            pending.done.wait()
        if pending.error is not None:
            e = pending.error
            raise again(e) from e
        return pending.data

    # ---- fetching ------------------------------------------------------------------------------
    def next_job_locked(self) -> tuple[Key, Pending] | None:
        """The next planned chunk to fetch in the background, or None (nothing that fits now)."""
        key = self.window.next_fetch(self.cfg.cache_bytes, lambda k: k in self.cache or k in self.inflight)
        if key is None:
            return None
        pending = self.inflight[key] = Pending()
        self.stats.prefetched += 1
        return key, pending

    def finish(self, key: Key, pending: Pending, data: bytes | None, error: BaseException | None) -> None:
        with self.cond:
            if data is not None and not self.closed:
                self.cache.insert(key, data, self.window.pins)
            self.inflight.pop(key, None)
            pending.data, pending.error = data, error
            pending.done.set()
            self.cond.notify_all()

    def fetch_into(self, key: Key, pending: Pending) -> None:
        try:
            data = self.s3.fetch(key)
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
        for i in range(max(1, self.cfg.threads)):
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
            self.window.clear()
            self.local.close_locked()
        self.s3.close()
