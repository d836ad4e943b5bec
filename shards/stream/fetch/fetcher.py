"""``ChunkFetcher``: the public face of the fetcher; its state lives in a per-process ``Runtime``."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable

from shards.store import Store
from shards.stream.fetch.config import FetchConfig, FetchStats
from shards.stream.fetch.retry import FetchError
from shards.stream.fetch.runtime import Runtime

_INIT_LOCK = threading.Lock()


def _reset_init_lock() -> None:
    global _INIT_LOCK
    _INIT_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_init_lock)


class ChunkFetcher:
    """Byte-range reads of a store's chunks with S3 read-ahead, an LRU byte-capped memory cache
    and bounded retries. See ``shards.stream.fetch`` for the design; all methods are thread safe."""

    def __init__(self, store: Store | str, *, cache_bytes: int = 1 << 30, threads: int = 8,
                 prefetch_depth: int = 64, retries: int = 8, backoff_s: float = 0.05,
                 max_backoff_s: float = 2.0, timeout_s: float = 30.0, give_up_s: float = 60.0):
        store = Store(store) if isinstance(store, str) else store
        self._cfg = FetchConfig(store=store, cache_bytes=int(cache_bytes), threads=int(threads),
                                prefetch_depth=int(prefetch_depth), retries=int(retries), backoff_s=float(backoff_s),
                                max_backoff_s=float(max_backoff_s), timeout_s=float(timeout_s),
                                give_up_s=float(give_up_s))
        self._closed = False
        self._rt_obj: Runtime | None = None
        self._finalizer = None

    @property
    def store(self) -> Store:
        return self._cfg.store

    def __repr__(self) -> str:
        return f"ChunkFetcher({self.store.uri!r})"

    # pickling carries the configuration only (e.g. to spawned DataLoader workers)
    def __getstate__(self) -> dict:
        return {"_cfg": self._cfg, "_closed": self._closed}

    def __setstate__(self, state: dict) -> None:
        self._cfg, self._closed = state["_cfg"], state["_closed"]
        self._rt_obj, self._finalizer = None, None

    def _rt(self) -> Runtime:
        """This process's runtime: made on first use here, and afresh in a forked child."""
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
                rt = Runtime(self._cfg)
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
        if rt.remote:
            rt.plan(items)

    def get(self, path: str, offset: int, length: int) -> bytes:
        """The bytes ``[offset, offset + length)`` of ``path``; blocks until they are here."""
        if self._closed:
            raise FetchError(f"{self!r} is closed")
        rt = self._rt()
        key = (str(path), int(offset), int(length))
        if key[1] < 0 or key[2] < 0:
            raise ValueError(f"bad byte range {key}")
        return rt.get(key) if rt.remote else rt.local.read(key)

    @property
    def stats(self) -> dict:
        """hits, misses, bytes_fetched, retries, evictions, cache_bytes (now), max_cache_bytes
        (peak), prefetched (chunks issued to the background threads)."""
        rt = self._rt_obj
        if rt is None or rt.pid != os.getpid():
            return FetchStats().to_dict()
        with rt.lock:
            return rt.stats.to_dict()

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

    def __enter__(self) -> ChunkFetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
