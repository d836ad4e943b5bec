"""A fetcher's settings and counters: plain records, shared by its parts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from shards.store import Store

Key = tuple  # (path, offset, length): one chunk's byte range


@dataclass(frozen=True)
class FetchConfig:
    """What ``ChunkFetcher`` was created with; the only thing it pickles (see ``shards.stream.fetch``)."""

    store: Store
    cache_bytes: int = 1 << 30  # hard cap of the in-memory byte cache, per process
    threads: int = 8  # S3 read-ahead threads
    prefetch_depth: int = 64  # planned items past the last one read that may be read ahead
    retries: int = 8  # attempts per ranged GET (one attempt = one HTTP request)
    backoff_s: float = 0.05  # full-jitter backoff: uniform(0, min(max_backoff_s, backoff_s * 2**k))
    max_backoff_s: float = 2.0
    timeout_s: float = 30.0  # connect and read timeout of one attempt
    give_up_s: float = 60.0  # no attempt starts later than this after the first


@dataclass
class FetchStats:
    """Counters of one process's fetcher (``ChunkFetcher.stats``); changed under the runtime's lock."""

    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    retries: int = 0
    evictions: int = 0
    cache_bytes: int = 0  # now
    max_cache_bytes: int = 0  # peak
    prefetched: int = 0  # chunks issued to the background threads

    def to_dict(self) -> dict:
        return asdict(self)
