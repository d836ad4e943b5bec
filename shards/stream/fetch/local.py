"""Local stores: ``os.pread`` on a small cache of open file descriptors.

There is no read-ahead and no byte cache for local stores: the page cache and kernel readahead
already do that job, and a copy through another cache would only cost. A descriptor evicted from
the cache (or left by ``close``) while a reader still uses it is closed by the last such reader.
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass

from shards.store import Store
from shards.stream.fetch.config import FetchStats, Key
from shards.stream.fetch.retry import FetchError, TruncatedShard

FD_CACHE = 64  # open files kept per process


@dataclass
class OpenFile:
    fd: int
    users: int = 0  # reads in progress on fd
    evicted: bool = False  # out of the cache: the last user closes fd


class LocalFiles:
    """Byte ranges of a local store's files; thread safe (``lock`` also guards ``stats``)."""

    def __init__(self, store: Store, lock: threading.Lock, stats: FetchStats):
        self.store, self.lock, self.stats = store, lock, stats
        self.files: collections.OrderedDict[str, OpenFile] = collections.OrderedDict()

    def _acquire(self, full: str) -> OpenFile:
        """The open file of ``full`` with one more user (caller holds ``lock``)."""
        entry = self.files.get(full)
        if entry is None:
            try:
                fd = os.open(full, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise FetchError(f"{full}: {e.strerror or e}") from e
            entry = self.files[full] = OpenFile(fd)
            while len(self.files) > FD_CACHE:
                _, old = self.files.popitem(last=False)
                old.evicted = True
                if old.users == 0:
                    os.close(old.fd)
        else:
            self.files.move_to_end(full)
        entry.users += 1
        return entry

    def read(self, key: Key) -> bytes:
        path, offset, length = key
        full = self.store.path(path)
        with self.lock:
            entry = self._acquire(full)
        try:
            parts, got = [], 0
            while got < length:
                b = os.pread(entry.fd, length - got, offset + got)
                if not b:
                    break
                parts.append(b)
                got += len(b)
        finally:
            with self.lock:
                entry.users -= 1
                if entry.evicted and entry.users == 0:
                    os.close(entry.fd)
        if got != length:
            raise TruncatedShard(f"{full} bytes {offset}-{offset + length}: file ends after {got} of {length} bytes")
        with self.lock:
            self.stats.misses += 1
            self.stats.bytes_fetched += length
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close_locked(self) -> None:
        """Close every file no reader uses; the others are closed by their last reader (caller holds
        ``lock``)."""
        for entry in self.files.values():
            entry.evicted = True
            if entry.users == 0:
                os.close(entry.fd)
        self.files.clear()
