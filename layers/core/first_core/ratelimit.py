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

The request unit and the user's tokens are taken together, in one conditional update of the
user's `tpm#` row, when the requests' window lies within that minute (a window of a second, or
any that divides the minute): the row then counts the window's requests in an attribute of their
own, `requests_{window start}`, beside `used` (the tokens), and one condition covers both. One
write instead of two on every request; a refusal reads the row once to say which limit it was.
Otherwise (no per-user token limit, or a window such as 7 s that straddles minutes) the request
unit has its own `rps#` row, as above.

Tokens are reserved up front, before anything is submitted: the prompt's estimate (body bytes
/ 4, an over-estimate for text) plus `max_tokens` (times `n`). A request that names none gets
one from the gateway, reserved and sent to vLLM so it cannot be overrun: the endpoint's cap, or
less when the caller's budget has less left in this window. When the request ends, `settle`
adds the difference between what was reserved and what was used to the same window's counters
(best effort, unconditional, may be negative), so the next requests in that minute see the real
use.

Several counters are taken side by side; if one refuses, the token units the others took are
given back. Between the take and the give-back a unit is held that was not used: limits err on
the side of refusing, never of letting more through.

Long because: the rows, their take (several limits in one row, all or none), the refusal's
reading of which limit it was, the fit of a request without max_tokens and the settle share
one row format; apart, each would have to know it.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pynamodb.attributes import NumberAttribute

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
    """One limit as it applies to one request: which row (and attribute of it), its limit, when
    the window ends."""

    key: str
    limit: int
    window_end: float  # epoch seconds
    kind: str  # "requests" or "tokens", for the message
    # The row's attribute that counts: `used`, or a request window's own in a `tpm#` row.
    attribute: str = "used"
    window_start: float | None = None  # when not the key's last part

    @property
    def expires_at(self) -> float:
        return self.window_end + _TTL_GRACE_SECONDS


@dataclass
class Reservation:
    """What a request took: the token counters and how many tokens it reserved on each."""

    tokens: int = 0
    counters: list[Counter] = field(default_factory=list)
    # Completion tokens per choice the gateway reserved for a request that named no max_tokens:
    # what it sends as `max_tokens` (None when the caller named it).
    max_tokens: int | None = None

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
    return take_together(counter.key, [(counter, units)])


def take_together(key: str, wanted: list[tuple[Counter, int]]) -> bool:
    """Take each counter's units from one row in one conditional update, all or none."""
    wanted = [(c, units) for c, units in wanted if units > 0]
    if not wanted:
        return True
    if any(units > c.limit for c, units in wanted):
        return False
    expires = datetime.fromtimestamp(max(c.expires_at for c, _ in wanted), tz=UTC)
    actions: list[Any] = [RateCounter.expires_at.set(expires)]
    condition: Any = None
    for counter, units in wanted:
        attribute = _attribute(counter)
        actions.append(attribute.add(units))
        fits = attribute.does_not_exist() | (attribute <= counter.limit - units)
        condition = fits if condition is None else condition & fits
    return update_if(RateCounter(key), actions, condition)


def _attribute(counter: Counter) -> Any:
    if counter.attribute == "used":
        return RateCounter.used
    return NumberAttribute(attr_name=counter.attribute)


def give_back(key: str, units: int, window_end: float) -> None:
    """Add `units` back (or, negative, more use) to a counter, without a condition."""
    if units == 0:
        return
    expires = datetime.fromtimestamp(window_end + _TTL_GRACE_SECONDS, tz=UTC)
    RateCounter(key).update(
        actions=[RateCounter.used.add(-units), RateCounter.expires_at.set(expires)]
    )


def used(key: str, attribute: str = "used") -> int:
    """What a counter holds now (0 if it was never taken); for tests and operators."""
    return int(_row(key).get(attribute, 0))


def requests_used(user_id: str, model: str, window_start: int) -> int:
    """The requests a user made of a model in the window that starts then, wherever they are
    counted (their own `rps#` row, or the minute's `tpm#` row); for tests and operators."""
    folded = _row(f"tpm#{user_id}#{model}#{window_start // 60}")
    own = used(f"rps#{user_id}#{model}#{window_start}")
    return own + int(folded.get(f"requests_{window_start}", 0))


def _row(key: str) -> dict[str, Any]:
    """A counter row's numbers, each attribute by name (a consistent read)."""
    item = RateCounter._get_connection().get_item(key, consistent_read=True).get("Item", {})
    return {name: float(value["N"]) for name, value in item.items() if "N" in value}


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


def token_counters_for(user_id: str, endpoint: Endpoint, now: float) -> list[Counter]:
    """The tokens-per-minute counters of this minute that apply to the user on the endpoint."""
    limits = limits_for(endpoint)
    minute = int(now // 60)
    counters: list[Counter] = []
    if limits.tokens_per_minute_per_user:
        counters.append(
            Counter(
                f"tpm#{user_id}#{endpoint.model}#{minute}",
                int(limits.tokens_per_minute_per_user),
                (minute + 1) * 60,
                "tokens",
            )
        )
    if limits.tokens_per_minute:
        counters.append(
            Counter(
                f"tpmm#{endpoint.cluster}#{endpoint.model}#{minute}",
                int(limits.tokens_per_minute),
                (minute + 1) * 60,
                "tokens",
            )
        )
    return counters


def take_tokens(counters: list[Counter], tokens: int) -> Counter | None:
    """Take `tokens` from every counter, or from none: the counter that refused (the others'
    units given back), None when all were taken."""
    wanted = [(c, tokens) for c in counters]
    refused, not_taken = _take_all(wanted)
    if refused:
        _give_back_tokens(wanted, not_taken)
        return refused[0]
    return None


def reserve(
    user_id: str,
    endpoint: Endpoint,
    prompt_tokens: int,
    max_output_tokens: int | None,
    choices: int = 1,
    *,
    fit: bool = False,
    now: float | None = None,
) -> Reservation:
    """Take one request and its token budget from every limit that applies, or raise
    `RateLimitError` (429, `Retry-After`) having taken nothing.

    The budget is `prompt_tokens + max_output_tokens * choices`. With `fit` the caller left
    `max_tokens` out and `max_output_tokens` is the most it may get (the endpoint's cap): the
    gateway then reserves, and sends (`Reservation.max_tokens`), that or less, so that it fits
    what the caller's token budget has left in this window. The real use is settled when the
    request ends."""
    now = time.time() if now is None else now
    limits = limits_for(endpoint)
    completion = max_output_tokens or 0
    counters: list[Counter] = []
    token_counters = token_counters_for(user_id, endpoint, now)
    if limits.requests_per_second_per_user:
        requests = request_counter(
            user_id, endpoint.model, limits.requests_per_second_per_user, now
        )
        counters.append(_folded(requests, token_counters))
    choices = max(1, choices)
    if fit and token_counters:
        completion = min(
            completion, _completion_within(token_counters, False, prompt_tokens, choices)
        )
    tokens = prompt_tokens + completion * choices
    for counter in token_counters:
        if tokens > counter.limit or (fit and completion < 1):
            scope = "per user" if counter.key.startswith("tpm#") else "for this endpoint"
            raise RateLimitError(
                f"Request too large for '{endpoint.model}': it may use up to {tokens} tokens "
                f"(prompt estimate plus max_tokens), more than the limit of {counter.limit} "
                f"tokens per minute {scope}. Lower max_tokens or shorten the prompt.",
                code="request_too_large",
            )
    wanted = [(c, 1 if c.kind == "requests" else tokens) for c in counters + token_counters]
    refused, not_taken = _take_all(wanted)
    # Without max_tokens, a request that does not fit takes what is left of the window (the
    # counters are read only then, so the usual case costs no read).
    for _ in range(_FIT_ATTEMPTS if fit else 0):
        if not refused or any(c.kind == "requests" for c in refused):
            break
        _give_back_tokens(wanted, not_taken)
        completion = min(
            completion, _completion_within(token_counters, True, prompt_tokens, choices)
        )
        if completion < 1:  # nothing left of the window for this request
            raise _limit_reached(endpoint, refused[0], prompt_tokens + choices, now)
        tokens = prompt_tokens + completion * choices
        # A request unit refused with the tokens of its row is taken again with them.
        wanted = [(c, 1) for c in counters if c in not_taken]
        wanted += [(c, tokens) for c in token_counters]
        refused, not_taken = _take_all(wanted)
    if refused:
        _give_back_tokens(wanted, not_taken)
        raise _limit_reached(endpoint, refused[0], tokens, now)
    return Reservation(tokens if token_counters else 0, token_counters, completion if fit else None)


def _folded(requests: Counter, token_counters: list[Counter]) -> Counter:
    """The request counter as an attribute of the user's `tpm#` row of this minute, when its
    window lies within the minute (so one update takes both); else its own `rps#` row."""
    own = next((c for c in token_counters if c.key.startswith("tpm#")), None)
    start = int(requests.key.rsplit("#", 1)[1])
    if own is None or 60 % int(requests.window_end - start):
        return requests
    return replace(requests, key=own.key, attribute=f"requests_{start}", window_start=start)


# Rounds of "read what is left, take it" before a request without max_tokens is refused (another
# request may take the rest between the read and the take).
_FIT_ATTEMPTS = 3


def _completion_within(
    token_counters: list[Counter], read: bool, prompt_tokens: int, choices: int
) -> int:
    """Completion tokens per choice that fit every token counter: within its limit, or with
    `read` within what is left of it now (one consistent read of each, side by side)."""
    if read:
        left = list(_TAKERS.map(lambda c: c.limit - used(c.key), token_counters))
    else:
        left = [c.limit for c in token_counters]
    return (min(left) - prompt_tokens) // choices


def _take_all(wanted: list[tuple[Counter, int]]) -> tuple[list[Counter], list[Counter]]:
    """Take each counter's units: one conditional update per row (the counters of one row all
    or none), the rows side by side, one round trip in all. The counters over their limit (the
    one to name first), and every counter not taken."""
    rows: dict[str, list[tuple[Counter, int]]] = {}
    for counter, units in wanted:
        rows.setdefault(counter.key, []).append((counter, units))
    jobs = list(rows.items())
    if len(jobs) > 1:
        outcomes = list(_TAKERS.map(lambda job: take_together(*job), jobs))
    else:
        outcomes = [take_together(*job) for job in jobs]
    refused: list[Counter] = []
    not_taken: list[Counter] = []
    for (key, pairs), ok in zip(jobs, outcomes, strict=True):
        if not ok:
            not_taken += [counter for counter, _ in pairs]
            refused += _over_limit(key, pairs)
    return refused, not_taken


def _over_limit(key: str, pairs: list[tuple[Counter, int]]) -> list[Counter]:
    """Which counters of a refused row did not fit (a read, only when the row holds several)."""
    if len(pairs) == 1:
        return [pairs[0][0]]
    row = _row(key)
    over = [c for c, units in pairs if row.get(c.attribute, 0) + units > c.limit]
    return over or [pairs[0][0]]  # freed since: name the first (the request unit)


def _give_back_tokens(wanted: list[tuple[Counter, int]], not_taken: list[Counter]) -> None:
    # A request unit stays taken: the request was made.
    for taken, units in wanted:
        if taken not in not_taken and taken.kind == "tokens":
            _safe_give_back(taken.key, units, taken.window_end)


def _limit_reached(endpoint: Endpoint, counter: Counter, tokens: int, now: float) -> RateLimitError:
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
    return RateLimitError(message, headers={"retry-after": str(wait)})


def _window_words(counter: Counter) -> str:
    start = counter.window_start
    start = int(counter.key.rsplit("#", 1)[1]) if start is None else start
    window = int(counter.window_end) - int(start)
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
