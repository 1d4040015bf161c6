"""Globus Compute's API limit: so many calls per client identity in a sliding window.

The service documents 20 API requests per 10 seconds per client (docs/limits.rst in
github.com/globus/globus-compute) and answers 429 beyond it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class ApiLimit:
    """`requests` API calls per `seconds` per client identity (0 requests: no limit)."""

    requests: int = 20
    seconds: float = 10.0

    @classmethod
    def parse(cls, text: str) -> ApiLimit:
        """`20/10` (N calls per S seconds), or `0` for none."""
        if text.strip() in ("0", "", "none"):
            return cls(0, 0.0)
        count, _, seconds = text.partition("/")
        limit = cls(int(count), float(seconds or 1))
        if limit.requests < 0 or limit.seconds <= 0:
            raise ValueError(f"not a limit: {text!r} (N/S, or 0)")
        return limit

    def budget(self) -> tuple[int, float]:
        """The gateway's budget (first_core.compute.budget) that never exceeds this limit:
        `calls` per fixed `window` of `seconds / k`, where a sliding `seconds` overlaps k + 1
        windows, so calls = requests // (k + 1); k up to 5 (20/10 gives 3 calls per 2 s).
        0 calls: none."""
        if not self.requests:
            return 0, 0.0
        k = max(1, min(5, self.requests - 1))
        return max(1, self.requests // (k + 1)), self.seconds / k

    def __str__(self) -> str:
        return f"{self.requests}/{self.seconds:g}" if self.requests else "0"


class SlidingWindow:
    """Calls per client over the last `seconds`: a call is refused when `requests` already
    fall inside the window, with the seconds until the oldest leaves it."""

    def __init__(self, limit: ApiLimit) -> None:
        self.limit = limit
        self._calls: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 if the call may go ahead (and it is counted), else seconds to wait."""
        if not self.limit.requests:
            return 0.0
        now = time.monotonic()
        with self._lock:
            calls = self._calls.setdefault(client, deque())
            while calls and calls[0] <= now - self.limit.seconds:
                calls.popleft()
            if len(calls) >= self.limit.requests:
                return calls[0] + self.limit.seconds - now
            calls.append(now)
            return 0.0
