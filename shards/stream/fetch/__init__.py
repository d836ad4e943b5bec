"""Fetch samples (chunks) by byte range, in a planned order, from a local store or S3.

    from shards.stream.fetch import ChunkFetcher, FetchError
    with ChunkFetcher(store) as f:
        f.prefetch(items)                  # (path, offset, length) in the order they will be read
        for path, offset, length in items:
            blob = f.get(path, offset, length)   # == store.read_range(path, offset, offset + length)

Local stores are read directly with ``os.pread`` on a small cache of open file descriptors
(``local``); ``prefetch`` is a no-op there. Nothing else below applies to local stores.

S3: one ranged GET per chunk (``remote``), retried by the policy of ``retry`` (full-jitter
exponential backoff on 5xx/SlowDown, timeouts and dropped connections; ``StoreUnavailable`` once it
is spent: an outage, never a corrupt sample). ``prefetch`` keeps a read-ahead window along the plan
(``window``), issued to ``threads`` background threads into an LRU in-memory byte cache with a hard
cap (``cache``, which says why memory and not disk). ``runtime`` ties them together in one process.

Processes: a fetcher holds only its configuration (``config.FetchConfig``) until first used;
threads, the s3fs client, the cache and file descriptors are created on first use *in the process
using it*, and are created afresh when a forked child uses a fetcher its parent used. So it
pickles, and is safe in ``torch.utils.data.DataLoader`` workers (fork or spawn) -- but each worker
then has its own threads and cache: create or first use the fetcher inside the worker (e.g. in the
dataset's ``__iter__``), never start its threads in the parent before the workers fork. Threads are
daemons and stop on ``close()`` or when the fetcher is garbage collected.
"""

from shards.stream.fetch.fetcher import ChunkFetcher
from shards.stream.fetch.retry import FetchError, StoreUnavailable, TruncatedShard, is_retryable

__all__ = ["ChunkFetcher", "FetchError", "StoreUnavailable", "TruncatedShard", "is_retryable"]
