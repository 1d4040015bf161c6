"""Rate limits that hold exactly however many gateway instances serve at once.

Every limit is a counter row in the `rate_counters` table, one row per key and window:

    rps#{user_id}#{model}#{window start}     requests per second per user (one unit a request)
    tpm#{user_id}#{model}#{epoch minute}     tokens per minute per user and model
    tpmm#{cluster}#{model}#{epoch minute}    tokens per minute for the whole endpoint

A unit is taken with one `UpdateItem ADD used :n` conditioned on
`attribute_not_exists(used) OR used <= :limit - :n`. DynamoDB applies the condition and the
add atomically per item, so no two instances can both take the last unit: the limit holds
exactly with any number of processes (an in-memory or read-then-write counter lets N replicas
take N times the limit). A refused take changes nothing.

Tokens are reserved up front, before anything is submitted: the prompt's estimate (body bytes
/ 4, an over-estimate for text) plus `max_tokens` (times `n`), or a default when the request
names none. When the request ends, `settle` adds the difference between what was reserved and
what was used to the same window's counters (best effort, unconditional, may be negative), so
the next requests in that minute see the real use.

Several counters are taken side by side; if one refuses, the token units the others took are
given back. Between the take and the give-back a unit is held that was not used: limits err on
the side of refusing, never of letting more through.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from first_core.errors import RateLimitError
from first_core.registry import Endpoint
from first_core.settings import get_settings
from first_core.tables import RateCounter, update_if

log = logging.getLogger("first.ratelimit")

# Counter rows outlive their window by this long (DynamoDB deletes them lazily, later still).
_TTL_GRACE_SECONDS = 300
_TAKERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ratelimit")


@dataclass(frozen=True)
class Counter:
    """One limit as it applies to one request: which row, its limit, when the window ends."""

    key: str
    limit: int
    window_end: float  # epoch seconds
    kind: str  # "requests" or "tokens", for the message

    @property
    def expires_at(self) -> float:
        return self.window_end + _TTL_GRACE_SECONDS


@dataclass
class Reservation:
    """What a request took: the token counters and how many tokens it reserved on each."""

    tokens: int = 0
    counters: list[Counter] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "counters": [
                {"key": c.key, "window_end": c.window_end}
                for c in self.counters
                if c.kind == "tokens"
            ],
        }


def retry_after(window_end: float, now: float | None = None) -> int:
    """Whole seconds until the window ends (at least 1), for the `Retry-After` header."""
    now = time.time() if now is None else now
    return max(1, math.ceil(window_end - now))


def take(counter: Counter, units: int) -> bool:
    """Take `units` from the counter if they fit under its limit; False (nothing taken) if not."""
    if units <= 0:
        return True
    if units > counter.limit:
        return False
    expires = datetime.fromtimestamp(counter.expires_at, tz=UTC)
    return update_if(
        RateCounter(counter.key),
        [RateCounter.used.add(units), RateCounter.expires_at.set(expires)],
        RateCounter.used.does_not_exist() | (RateCounter.used <= counter.limit - units),
    )


def give_back(key: str, units: int, window_end: float) -> None:
    """Add `units` back (or, negative, more use) to a counter, without a condition."""
    if units == 0:
        return
    expires = datetime.fromtimestamp(window_end + _TTL_GRACE_SECONDS, tz=UTC)
    RateCounter(key).update(
        actions=[RateCounter.used.add(-units), RateCounter.expires_at.set(expires)]
    )


def used(key: str) -> int:
    """What a counter holds now (0 if it was never taken); for tests and operators."""
    try:
        return int(RateCounter.get(key, consistent_read=True).used or 0)
    except RateCounter.DoesNotExist:
        return 0


# ---- the limits of one request ------------------------------------------------------------------


@dataclass(frozen=True)
class EffectiveLimits:
    """The limits that apply to one caller on one endpoint."""

    requests_per_second_per_user: float | None
    tokens_per_minute_per_user: int | None
    tokens_per_minute: int | None


def limits_for(endpoint: Endpoint) -> EffectiveLimits:
    """The endpoint's limits from the registry; where it names none, the settings' defaults
    (0 there means no limit)."""
    s = get_settings()
    own = endpoint.limits

    def pick(value: Any, default: Any) -> Any:
        value = default if value is None else value
        return value if value else None

    return EffectiveLimits(
        pick(own.requests_per_second_per_user, s.default_requests_per_second_per_user),
        pick(own.tokens_per_minute_per_user, s.default_tokens_per_minute_per_user),
        pick(own.tokens_per_minute, s.default_tokens_per_minute),
    )


def request_counter(user_id: str, model: str, per_second: float, now: float) -> Counter:
    """The requests-per-second counter. A fractional limit (0.5/s) becomes one request per
    window of ceil(1 / limit) seconds."""
    window = max(1, math.ceil(1 / per_second)) if per_second < 1 else 1
    start = int(now // window) * window
    limit = max(1, math.floor(per_second * window))
    return Counter(f"rps#{user_id}#{model}#{start}", limit, start + window, "requests")


def prompt_estimate(raw_body_bytes: int) -> int:
    """Tokens the prompt may use, estimated from the body (about 4 bytes a token for text)."""
    return math.ceil(raw_body_bytes / 4)


def reserve(
    user_id: str,
    endpoint: Endpoint,
    prompt_tokens: int,
    max_output_tokens: int | None,
    choices: int = 1,
    *,
    now: float | None = None,
) -> Reservation:
    """Take one request and its token budget from every limit that applies, or raise
    `RateLimitError` (429, `Retry-After`) having taken nothing.

    The budget is `prompt_tokens + max_output_tokens * choices`; a request that names no
    `max_tokens` reserves the settings' default (capped by the endpoint's `max_tokens` and by
    what its token limits allow at all), and the real use is settled when it ends."""
    now = time.time() if now is None else now
    limits = limits_for(endpoint)
    completion = max_output_tokens
    if completion is None:
        completion = get_settings().default_reserved_completion_tokens
        if endpoint.limits.max_tokens is not None:
            completion = min(completion, endpoint.limits.max_tokens)
    tokens = prompt_tokens + completion * max(1, choices)
    minute = int(now // 60)
    counters: list[Counter] = []
    if limits.requests_per_second_per_user:
        counters.append(
            request_counter(user_id, endpoint.model, limits.requests_per_second_per_user, now)
        )
    token_counters: list[Counter] = []
    if limits.tokens_per_minute_per_user:
        token_counters.append(
            Counter(
                f"tpm#{user_id}#{endpoint.model}#{minute}",
                int(limits.tokens_per_minute_per_user),
                (minute + 1) * 60,
                "tokens",
            )
        )
    if limits.tokens_per_minute:
        token_counters.append(
            Counter(
                f"tpmm#{endpoint.cluster}#{endpoint.model}#{minute}",
                int(limits.tokens_per_minute),
                (minute + 1) * 60,
                "tokens",
            )
        )
    if max_output_tokens is None and token_counters:
        tokens = min(tokens, max(prompt_tokens, min(c.limit for c in token_counters)))
    for counter in token_counters:
        if tokens > counter.limit:
            scope = "per user" if counter.key.startswith("tpm#") else "for this endpoint"
            raise RateLimitError(
                f"Request too large for '{endpoint.model}': it may use up to {tokens} tokens "
                f"(prompt estimate plus max_tokens), more than the limit of {counter.limit} "
                f"tokens per minute {scope}. Lower max_tokens or shorten the prompt.",
                code="request_too_large",
            )
    # The counters are independent rows: take them side by side, one round trip in all.
    wanted = [(c, 1 if c.kind == "requests" else tokens) for c in counters + token_counters]
    if len(wanted) > 1:
        outcomes = list(_TAKERS.map(lambda pair: take(*pair), wanted))
    else:
        outcomes = [take(*pair) for pair in wanted]
    refused = [counter for (counter, _), ok in zip(wanted, outcomes, strict=True) if not ok]
    if refused:
        for (taken, units), ok in zip(wanted, outcomes, strict=True):
            if ok and taken.kind == "tokens":  # a request unit stays taken: the request was made
                _safe_give_back(taken.key, units, taken.window_end)
        counter = refused[0]
        wait = retry_after(counter.window_end, now=now)
        if counter.kind == "requests":
            message = (
                f"Rate limit reached for '{endpoint.model}': {counter.limit} request(s) per "
                f"{_window_words(counter)} per user. Retry after {wait} s."
            )
        else:
            scope = "per user" if counter.key.startswith("tpm#") else "for this endpoint"
            message = (
                f"Rate limit reached for '{endpoint.model}': {counter.limit} tokens per minute "
                f"{scope}; this request would reserve {tokens}. Retry after {wait} s."
            )
        raise RateLimitError(message, headers={"retry-after": str(wait)})
    return Reservation(tokens if token_counters else 0, token_counters)


def _window_words(counter: Counter) -> str:
    window = int(counter.window_end) - int(counter.key.rsplit("#", 1)[1])
    return "second" if window == 1 else f"{window} seconds"


def settle(reservation: dict[str, Any] | None, actual_tokens: int) -> None:
    """At the end of a request: give back what was reserved but not used (or take the excess),
    on the same window's counters. Best effort: a failure is logged, never raised."""
    if not reservation:
        return
    # Usage is never negative (callbacks are checked): should one be, it credits nothing.
    difference = int(reservation.get("tokens", 0)) - max(0, int(actual_tokens))
    for counter in reservation.get("counters", []):
        _safe_give_back(str(counter["key"]), difference, float(counter["window_end"]))


def charge(reservation: dict[str, Any] | None, tokens: int) -> None:
    """Tokens used after the request was settled (a cancelled stream's late usage)."""
    if not reservation or int(tokens) <= 0:  # a charge never credits
        return
    for counter in reservation.get("counters", []):
        _safe_give_back(str(counter["key"]), -int(tokens), float(counter["window_end"]))


def _safe_give_back(key: str, units: int, window_end: float) -> None:
    try:
        give_back(key, units, window_end)
    except Exception:  # best effort: the counter's window ends within a minute anyway
        log.exception("could not adjust rate counter %s by %d", key, -units)
