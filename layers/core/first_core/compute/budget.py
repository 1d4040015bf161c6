"""One budget of Globus Compute API calls for the gateway's client identity, shared by every
function instance.

Globus Compute allows a client 20 API requests per 10 s (docs/limits.rst in
github.com/globus/globus-compute) and the whole gateway calls it as one client
(`GLOBUS_COMPUTE_CLIENT_ID`). Every call any function makes first takes a unit here, so the
service never has to refuse one (a 429 holds the SDK's one lock while it sleeps and retries).

The budget is a counter row in the `rate_counters` table per fixed window,
`gcapi#{client id}#{window start}`, taken with the same conditional `ADD` as the rate limits
(`ratelimit.take`): it holds across any number of Lambda instances. The service counts over a
*sliding* 10 s, and a sliding window overlaps `10 / window + 1` fixed ones, so the default of 3
calls per 2 s gives 15 calls per 10 s on average and never more than 18 in any 10 s.

Who may take a unit depends on what the call is for (`priority`, a context variable set by the
caller, default `SUBMIT_NOW`):

- `SUBMITTER` (the submitter sending a whole batch of queued requests): every unit, so the last
  `compute_api_queue_reserve` units of each window always go to queued user requests;
- `SUBMIT_NOW` (a request submitted at once: the lowest latency at low load) and `BACKGROUND`
  (health poller, reconciler, batch driver, registration) share the rest. A request that finds
  none goes to the queue at once; background work waits for a later window, so under load it
  slows down and the users' requests are not crowded out.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import os
import time
from collections.abc import Iterator

from first_core.errors import ServiceUnavailableError
from first_core.ratelimit import Counter, take
from first_core.settings import get_settings


class Priority(enum.Enum):
    """Who is spending: a user's request, the submitter (which may dip into the reserve), or
    background work."""

    SUBMITTER = "submitter"
    SUBMIT_NOW = "submit_now"
    BACKGROUND = "background"


_priority: contextvars.ContextVar[Priority] = contextvars.ContextVar(
    "globus_compute_priority", default=Priority.SUBMIT_NOW
)
# A unit taken ahead of the call that uses it (the proxy decides between now and the queue
# before it writes the request's record).
_prepaid: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "globus_compute_prepaid", default=False
)


class BudgetExhausted(ServiceUnavailableError):
    """No Globus Compute API call may be made now; `retry_in` seconds until the next window."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(
            "The gateway's Globus Compute API budget is used up for now; retry shortly.",
            headers={"Retry-After": str(max(1, round(retry_in)))},
            code="compute_api_budget",
        )
        self.retry_in = retry_in


@contextlib.contextmanager
def priority(level: Priority) -> Iterator[None]:
    """Calls made inside take units at this priority."""
    token = _priority.set(level)
    try:
        yield
    finally:
        _priority.reset(token)


@contextlib.contextmanager
def prepaid() -> Iterator[None]:
    """The next call inside uses the unit its caller already took."""
    token = _prepaid.set(True)
    try:
        yield
    finally:
        _prepaid.reset(token)


def _limit_for(level: Priority, calls: int) -> int:
    """How many of a window's units a call of this priority may be among."""
    if level is Priority.SUBMITTER:
        return calls
    shared = calls - get_settings().compute_api_queue_reserve
    # A request never submits at once when all is reserved (it queues); background work always
    # gets a turn, if only the first unit of a window.
    return shared if level is Priority.SUBMIT_NOW else max(1, shared)


def try_take(now: float | None = None) -> float:
    """Take one unit at the current priority: 0.0 if taken, else seconds to the next window."""
    settings = get_settings()
    calls, window = settings.compute_api_calls_per_window, settings.compute_api_window_seconds
    if calls <= 0:
        return 0.0
    now = time.time() if now is None else now
    start = (now // window) * window
    client = os.environ.get("GLOBUS_COMPUTE_CLIENT_ID", "default")
    counter = Counter(
        f"gcapi#{client}#{start:.3f}", _limit_for(_priority.get(), calls), start + window, "calls"
    )
    return 0.0 if take(counter, 1) else start + window - now


def spend(wait: float | None = None) -> None:
    """Take one unit before a Globus Compute API call, or raise `BudgetExhausted`.

    `wait`: seconds this caller may wait for a later window (default: a few windows; the proxy
    passes 0, since a request that finds no unit goes to the queue instead)."""
    if _prepaid.get():
        _prepaid.set(False)
        return
    if wait is None:
        wait = min(4 * get_settings().compute_api_window_seconds, 10.0)
    deadline = time.monotonic() + wait
    while True:
        retry_in = try_take()
        if not retry_in:
            return
        if time.monotonic() + retry_in > deadline:
            raise BudgetExhausted(retry_in)
        # Into the next window, with a little spread so waiting instances do not all collide.
        time.sleep(retry_in + 0.01 + (time.monotonic() % 0.05))
