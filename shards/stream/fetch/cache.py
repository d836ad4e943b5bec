"""The S3 byte cache: chunks by byte range, least recently used out first, never a pinned one.

**The cache is in memory, not on disk**, because: its job is read-ahead for an order known in
advance plus reuse of a chunk whose windows the plan puts close together (a few hundred chunks of
a few hundred KB), not a second copy of the dataset; memory leaves nothing behind when a process
is killed (an on-disk cache needs per-process directories, atomic writes and sweeping of dead
processes' directories, and a pid in a directory name is not unique across containers sharing a
cache root); and a disk cache would add a write and a read to every chunk. The cost is RSS: every
process (DataLoader worker) holds up to its own ``cache_bytes``, so size it per worker: e.g.
``prefetch_depth`` x chunk size x a few.

``cache_bytes`` is a hard cap (``stats['max_cache_bytes']`` shows the peak). What the consumer
has not reached yet is pinned by the read-ahead window (``shards.stream.fetch.window``) and never
evicted; a chunk that would only fit by evicting pinned ones is not cached.
"""

from __future__ import annotations

import collections
from collections.abc import Container

from shards.stream.fetch.config import FetchStats, Key


class ByteCache:
    """Not thread safe by itself: the fetcher calls it under its runtime's lock."""

    def __init__(self, cap: int, stats: FetchStats):
        self.cap, self.stats = cap, stats
        self.chunks: collections.OrderedDict[Key, bytes] = collections.OrderedDict()

    def __contains__(self, key: Key) -> bool:
        return key in self.chunks

    def get(self, key: Key) -> bytes | None:
        """The cached bytes of ``key`` (now the most recently used), or None."""
        data = self.chunks.get(key)
        if data is not None:
            self.chunks.move_to_end(key)
        return data

    def insert(self, key: Key, data: bytes, pinned: Container[Key]) -> None:
        """Cache ``data`` unless it is there already or cannot fit without evicting a ``pinned`` key."""
        n = len(data)
        if key in self.chunks or n > self.cap:
            return
        while self.stats.cache_bytes + n > self.cap:
            victim = next((k for k in self.chunks if k not in pinned), None)
            if victim is None:
                return  # only pinned chunks left: do not cache this one
            self.stats.cache_bytes -= len(self.chunks.pop(victim))
            self.stats.evictions += 1
        self.chunks[key] = data
        self.stats.cache_bytes += n
        self.stats.max_cache_bytes = max(self.stats.max_cache_bytes, self.stats.cache_bytes)

    def clear(self) -> None:
        self.chunks.clear()
        self.stats.cache_bytes = 0
