"""The limit on failed authentications per client address, across every gateway instance.

A flood of made-up tokens would otherwise cost one Globus introspection each. Every refused
bearer token (malformed, or refused by Globus now or from the refusal cache) adds one to the
address's counter row in the `rate_counters` table,

    authfail#{address}#{window start}

with the same atomic conditional ADD as the rate limits (first_core.ratelimit.take), so the
limit holds whatever the number of instances. Past `auth_failures_per_address` in a window of
`auth_failure_window_seconds`, a request from that address whose token is not already cached
gets 429 with `Retry-After` before any call to Globus (first_core.auth checks the caches
first: a valid cached token is never refused because of its address). An instance that has
seen an address past its limit remembers it until the window ends, so a blocked flood costs
no DynamoDB call either. The address is `first_core.credentials.source_address`, counted by
`address_key` (an IPv6 client by its /64).

The limit serves Globus, not correctness: if DynamoDB cannot be read or written for it, the
request goes on as if there were no limit (and the failure is logged).
"""

from __future__ import annotations

import logging
import time

from first_core.credentials import address_key
from first_core.errors import RateLimitError
from first_core.lru import ExpiringLRU
from first_core.ratelimit import Counter, retry_after, take, used
from first_core.settings import get_settings

log = logging.getLogger("first.auth")


class FailedAuthentications:
    """Counts failed authentications per address and refuses an address past its limit."""

    def __init__(self) -> None:
        # address key -> the end of the window it is blocked for (this instance's knowledge).
        self._blocked: ExpiringLRU[float] = ExpiringLRU(get_settings().refused_token_cache_entries)

    def counter(self, address: str, now: float) -> Counter:
        s = get_settings()
        window = max(1, s.auth_failure_window_seconds)
        start = int(now // window) * window
        key = f"authfail#{address_key(address)}#{start}"
        return Counter(key, s.auth_failures_per_address, start + window, "failures")

    def check(self, address: str | None) -> None:
        """429 if the address is past its limit (one consistent read, unless this instance
        already knows); before a token that is not cached is sent to Globus."""
        if address is None or get_settings().auth_failures_per_address <= 0:
            return
        now = time.time()
        self._refuse_if_known(address, now)
        counter = self.counter(address, now)
        try:
            over = used(counter.key) >= counter.limit
        except Exception:  # the limit protects Globus; an unreadable counter lets the call go
            log.exception("could not read the failed-authentication counter")
            return
        if over:
            raise self._block(address, counter, now)

    def count(self, address: str | None) -> None:
        """One more failed authentication from the address; 429 instead of the refusal at hand
        if the address was already past its limit."""
        if address is None or get_settings().auth_failures_per_address <= 0:
            return
        now = time.time()
        self._refuse_if_known(address, now)
        counter = self.counter(address, now)
        try:
            counted = take(counter, 1)
        except Exception:  # best effort, as check()
            log.exception("could not count a failed authentication")
            return
        if not counted:
            raise self._block(address, counter, now)

    def _refuse_if_known(self, address: str, now: float) -> None:
        window_end = self._blocked.get(address_key(address), now)
        if window_end is not None:
            raise _too_many(retry_after(window_end, now=now))

    def _block(self, address: str, counter: Counter, now: float) -> RateLimitError:
        self._blocked.put(address_key(address), counter.window_end, counter.window_end)
        return _too_many(retry_after(counter.window_end, now=now))


def _too_many(wait: int) -> RateLimitError:
    s = get_settings()
    return RateLimitError(
        f"Too many failed authentications from your address (more than "
        f"{s.auth_failures_per_address} in {s.auth_failure_window_seconds} s). Retry after "
        f"{wait} s with a valid Globus access token (get one with `first-auth token`).",
        code="too_many_failed_authentications",
        headers={"Retry-After": str(wait)},
    )
