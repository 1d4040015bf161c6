"""A bounded, expiring, thread-safe map in one instance's memory.

The authenticator's caches (verdicts, refused tokens, users' groups) and the failed-
authentication limit's memory of blocked addresses are keyed by what callers send: a flood of
made-up tokens or addresses must not grow them without bound. Each entry carries the instant
it stops being trusted; past `max_entries`, the least recently used entry is dropped first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class ExpiringLRU(Generic[V]):
    """At most `max_entries` values, each until its own instant (epoch seconds)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(1, max_entries)
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, now: float) -> V | None:
        """The value if it is still trusted at `now` (it becomes the most recently used)."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            if hit[0] <= now:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return hit[1]

    def until(self, key: str) -> float | None:
        """When the entry stops being trusted (None: no entry); for tests and operators."""
        with self._lock:
            hit = self._entries.get(key)
            return None if hit is None else hit[0]

    def put(self, key: str, value: V, until: float) -> None:
        with self._lock:
            self._entries[key] = (until, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def discard(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
