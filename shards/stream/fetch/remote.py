"""One chunk from S3: a ranged GET on a private s3fs client, under the retry policy (``retry``)."""

from __future__ import annotations

import random
import threading
import time

from shards.store import s3_endpoint
from shards.stream.fetch.config import FetchConfig, FetchStats, Key
from shards.stream.fetch.retry import FetchError, StoreUnavailable, TruncatedShard, backoff_cap, describe, is_retryable


class RemoteReader:
    """Ranged GETs of one process. ``stop`` (set by ``close``) cuts the backoff sleeps short;
    ``lock`` guards ``stats``."""

    def __init__(self, cfg: FetchConfig, stop: threading.Event, lock: threading.Lock, stats: FetchStats):
        self.cfg, self.store, self.stop, self.lock, self.stats = cfg, cfg.store, stop, lock, stats
        self.rng = random.Random()
        self._fs = None

    @property
    def fs(self):
        """A private s3fs instance with the store's options, retrying nothing by itself."""
        if self._fs is None:
            base = self.store.fs
            opts = dict(getattr(base, "storage_options", {}) or {})
            cfg = dict(opts.get("config_kwargs") or {})
            timeout = self.cfg.timeout_s
            cfg.update(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=timeout,
                       read_timeout=timeout, max_pool_connections=max(10, 2 * self.cfg.threads))
            opts.update(config_kwargs=cfg, skip_instance_cache=True, use_listings_cache=False)
            fs = type(base)(**opts)
            fs.retries = 1  # s3fs' own loop (class attribute, not an __init__ argument at 2026.9)
            self._fs = fs
        return self._fs

    @property
    def endpoint(self) -> str:
        opts = getattr(self.store.fs, "storage_options", {}) or {}
        return (opts.get("client_kwargs") or {}).get("endpoint_url") or s3_endpoint()

    def fetch(self, key: Key) -> bytes:
        """The bytes of ``key``, or FetchError (not retried), TruncatedShard (still short after every
        attempt) or StoreUnavailable (the policy is spent)."""
        path, offset, length = key
        url = self.store.url(path)
        where = f"{url} bytes {offset}-{offset + length}"
        if length == 0:
            return b""
        last, short = "no attempt", False
        t0 = time.monotonic()
        made = 0
        for attempt in range(max(1, self.cfg.retries)):
            if attempt:
                if self.stop.wait(self.rng.uniform(0.0, backoff_cap(attempt, self.cfg.backoff_s,
                                                                    self.cfg.max_backoff_s))):
                    break
                if time.monotonic() - t0 > self.cfg.give_up_s:
                    break  # no attempt starts later than give_up_s after the first
                with self.lock:
                    self.stats.retries += 1
            if self.stop.is_set():
                break
            made += 1
            try:
                data = self.fs.cat_file(self.store.path(path), start=offset, end=offset + length)
            except Exception as e:  # noqa: BLE001 - classified right here
                if not is_retryable(e):
                    raise FetchError(f"{where}: {describe(e)} (not retried)") from e
                last, short = describe(e), False
                continue
            if len(data) == length:
                with self.lock:
                    self.stats.bytes_fetched += length
                return data
            last, short = f"short body: {len(data)} of {length} bytes", True
        if self.stop.is_set():
            raise FetchError(f"{where}: fetcher closed")
        elapsed = time.monotonic() - t0
        if short:
            raise TruncatedShard(f"{where}: the object ends early ({last}, {made} attempts)")
        raise StoreUnavailable(f"S3 endpoint {self.endpoint} unreachable after {made} attempt{'s' * (made != 1)} "
                               f"over {elapsed:.1f} s reading {where}; last error: {last}",
                               endpoint=self.endpoint, url=url, attempts=made, elapsed_s=elapsed, last=last)

    def close(self) -> None:
        self._fs = None
