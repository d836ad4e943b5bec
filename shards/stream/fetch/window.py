"""The S3 read-ahead window along the planned order of reads.

``prefetch`` keeps a read-ahead window: at most ``prefetch_depth`` planned items past the last one
``get`` returned are issued to the background threads, and only while the bytes they pin fit in
``cache_bytes``. ``get`` may skip planned items (the window slides past them: the items planned
before the one asked for count as passed), read passed items late (within ``prefetch_depth`` gets:
out of order, the window stays put) or ask for unplanned ones (fetched on the spot); ``prefetch``
may be called again to append to the plan. It pulls ``items`` lazily, so a generator over a whole
epoch costs only the window's memory.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shards.stream.fetch.config import Key


@dataclass
class Slot:
    """One planned read in the window."""

    key: Key
    pinned: bool = False  # issued for read-ahead: its bytes stay cached until the window passes it


class ReadAhead:
    """The window of planned reads and the keys it pins. Not thread safe by itself: the fetcher
    calls it under its runtime's lock."""

    def __init__(self, depth: int):
        self.depth = max(1, depth)
        self.plans: collections.deque = collections.deque()  # iterators of planned items, in order
        self.error: BaseException | None = None  # a broken plan iterator, raised by the next get
        self.slots: collections.deque[Slot] = collections.deque()  # pulled, not yet passed
        self.issued = 0  # slots[:issued] were handed to the prefetch threads (or found cached)
        self.where: dict[Key, int] = collections.defaultdict(int)  # key -> occurrences in slots
        self.pins: dict[Key, int] = {}  # key -> pinned occurrences in slots
        self.pinned_bytes = 0
        self.gets = 0
        self.passed: collections.deque = collections.deque()  # (gets, key) popped unread, recently
        self.passed_count: dict[Key, int] = {}

    def add(self, items: Iterable) -> None:
        """Append planned ``(path, offset, length)`` items, pulled lazily."""
        self.plans.append(iter(items))

    def take_error(self) -> BaseException | None:
        """The error of a broken plan iterator (once), or None."""
        e, self.error = self.error, None
        return e

    def pull(self) -> None:
        """Fill the window from the plan, up to ``depth`` slots."""
        while len(self.slots) < self.depth and self.plans:
            try:
                path, offset, length = next(self.plans[0])
                key = (str(path), int(offset), int(length))
            except StopIteration:
                self.plans.popleft()
                continue
            except Exception as e:  # a broken plan iterator: drop it, report it on the next get
                self.plans.popleft()
                self.error = e
                continue
            self.slots.append(Slot(key))
            self.where[key] += 1

    def _pin(self, key: Key) -> None:
        n = self.pins.get(key, 0)
        if n == 0:
            self.pinned_bytes += key[2]
        self.pins[key] = n + 1

    def _unpin(self, key: Key) -> None:
        n = self.pins[key] - 1
        if n == 0:
            del self.pins[key]
            self.pinned_bytes -= key[2]
        else:
            self.pins[key] = n

    def consume(self, key: Key) -> None:
        """The consumer reached ``key``: pass every window item up to its first occurrence.

        Items passed unread are remembered for ``depth`` gets: a get of one of them is a read out of
        order (e.g. a batch read in another order than it was planned), which must not jump the
        window to a later occurrence of the same chunk."""
        self.gets += 1
        if self.passed_count.get(key):
            for i, (_, k) in enumerate(self.passed):
                if k == key:
                    del self.passed[i]
                    break
            self._drop_passed(key)
        elif self.where.get(key):
            while self.slots:
                slot = self.slots.popleft()
                self.issued = max(0, self.issued - 1)
                self.where[slot.key] -= 1
                if not self.where[slot.key]:
                    del self.where[slot.key]
                if slot.pinned:
                    self._unpin(slot.key)
                if slot.key == key:
                    break
                self.passed.append((self.gets, slot.key))
                self.passed_count[slot.key] = self.passed_count.get(slot.key, 0) + 1
        horizon = self.gets - self.depth
        while self.passed and self.passed[0][0] <= horizon:
            self._drop_passed(self.passed.popleft()[1])

    def _drop_passed(self, key: Key) -> None:
        n = self.passed_count[key] - 1
        if n:
            self.passed_count[key] = n
        else:
            del self.passed_count[key]

    def next_fetch(self, cap: int, present: Callable[[Key], bool]) -> Key | None:
        """Pin and return the next planned chunk to read ahead, or None (nothing that fits in ``cap``
        bytes now). Chunks ``present`` (cached or in flight) are pinned and skipped."""
        self.pull()
        while self.issued < len(self.slots):
            slot = self.slots[self.issued]
            key = slot.key
            if key not in self.pins:
                if key[2] > cap:  # can never be cached: get() fetches it when asked
                    self.issued += 1
                    continue
                if self.pinned_bytes + key[2] > cap:
                    return None
            self.issued += 1
            slot.pinned = True
            self._pin(key)
            if present(key):
                continue
            return key
        return None

    def clear(self) -> None:
        self.slots.clear()
        self.plans.clear()
        self.where.clear()
        self.passed.clear()
        self.passed_count.clear()
        self.pins.clear()
        self.pinned_bytes = 0
