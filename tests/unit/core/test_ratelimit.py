"""Rate limits: conditional DynamoDB counters that hold exactly under concurrency, their
windows, Retry-After, and the token reservation settled at the end of a request."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from first_core import ratelimit
from first_core.errors import RateLimitError
from first_core.ratelimit import (
    Counter,
    charge,
    requests_used,
    reserve,
    retry_after,
    settle,
    take,
    used,
)
from first_core.registry import Endpoint, FunctionIds, Limits
from first_core.settings import get_settings

MODEL = "meta-llama/Llama-3.2-1B-Instruct"
T0 = 1_800_000_000.0  # a whole second and a whole minute (1_800_000_000 = 60 * 30_000_000)


def endpoint(**limits: Any) -> Endpoint:
    return Endpoint(
        cluster="polaris",
        framework="vllm",
        model=MODEL,
        endpoint_id="local-polaris-vllm",
        functions=FunctionIds(inference="local:inference"),
        limits=Limits(**limits),
        allowed_groups=[],
        status="online",
    )


def test_exactly_the_limit_of_fifty_concurrent_takers_succeed(atomic_moto: None) -> None:
    counter = Counter("rps#alice#m#1", limit=7, window_end=T0 + 1, kind="requests")
    assert used(counter.key) == 0  # (connects once, before the race)
    start = threading.Barrier(50)

    def racer(_: int) -> bool:
        start.wait()
        return take(counter, 1)

    with ThreadPoolExecutor(max_workers=50) as pool:
        outcomes = list(pool.map(racer, range(50)))

    assert outcomes.count(True) == 7
    assert used(counter.key) == 7


def test_concurrent_token_takers_never_pass_the_limit(atomic_moto: None) -> None:
    counter = Counter("tpm#alice#m#1", limit=1000, window_end=T0 + 60, kind="tokens")
    sizes = [130, 70, 250, 40, 300, 90, 160, 210] * 4  # 32 takers, 5,000 tokens asked
    assert used(counter.key) == 0
    start = threading.Barrier(len(sizes))

    def racer(units: int) -> int:
        start.wait()
        return units if take(counter, units) else 0

    with ThreadPoolExecutor(max_workers=len(sizes)) as pool:
        granted = sum(pool.map(racer, sizes))

    assert granted == used(counter.key) <= 1000
    assert granted > 1000 - min(sizes)  # the counter only refuses what would not fit


def test_a_refused_take_changes_nothing(aws: None) -> None:
    counter = Counter("tpm#bob#m#1", limit=100, window_end=T0 + 60, kind="tokens")
    assert take(counter, 60)
    assert not take(counter, 41)
    assert used(counter.key) == 60
    assert take(counter, 40)
    assert not take(counter, 1)
    assert not take(counter, 101)  # never fits, even in an empty window
    assert used(counter.key) == 100


def test_requests_per_second_roll_over_to_the_next_window(aws: None) -> None:
    limited = endpoint(requests_per_second_per_user=2, tokens_per_minute_per_user=0)
    reserve("alice", limited, 10, 5, now=T0 + 0.1)
    reserve("alice", limited, 10, 5, now=T0 + 0.5)
    with pytest.raises(RateLimitError) as refused:
        reserve("alice", limited, 10, 5, now=T0 + 0.9)
    assert refused.value.status == 429
    assert refused.value.headers["retry-after"] == "1"
    assert refused.value.to_body()["error"]["type"] == "rate_limit_error"
    assert refused.value.to_body()["error"]["code"] == "rate_limit_exceeded"
    # Another user, and the next second, have their own counters.
    reserve("bob", limited, 10, 5, now=T0 + 0.9)
    reserve("alice", limited, 10, 5, now=T0 + 1.0)
    assert requests_used("alice", MODEL, int(T0)) == 2
    assert requests_used("alice", MODEL, int(T0) + 1) == 1


def test_the_request_and_its_tokens_are_one_conditional_update_of_one_row(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    limited = endpoint(requests_per_second_per_user=2, tokens_per_minute_per_user=1000)
    updates: list[str] = []
    real = ratelimit.update_if

    def counting(record: Any, actions: Any, condition: Any) -> bool:
        updates.append(record.key)
        return real(record, actions, condition)

    monkeypatch.setattr(ratelimit, "update_if", counting)
    minute = int(T0) // 60
    reserve("alice", limited, 10, 90, now=T0 + 0.1)
    assert updates == [f"tpm#alice#{MODEL}#{minute}"]  # one write, both limits
    assert used(f"tpm#alice#{MODEL}#{minute}") == 100
    assert requests_used("alice", MODEL, int(T0)) == 1
    # Over the tokens: nothing is taken, neither tokens nor the request unit.
    with pytest.raises(RateLimitError) as refused:
        reserve("alice", limited, 10, 950, now=T0 + 0.2)
    assert "tokens per minute" in refused.value.message
    assert used(f"tpm#alice#{MODEL}#{minute}") == 100
    assert requests_used("alice", MODEL, int(T0)) == 1
    # Over the requests: the message names them.
    reserve("alice", limited, 10, 10, now=T0 + 0.3)
    with pytest.raises(RateLimitError) as refused:
        reserve("alice", limited, 10, 10, now=T0 + 0.4)
    assert "2 request(s) per second" in refused.value.message
    assert used(f"tpm#alice#{MODEL}#{minute}") == 120


def test_a_requests_window_that_straddles_minutes_keeps_a_row_of_its_own(aws: None) -> None:
    # One request per 7 s: windows of 7 s do not divide the minute.
    slow = endpoint(requests_per_second_per_user=1 / 7, tokens_per_minute_per_user=1000)
    now = T0 + 58.0  # the window holding it starts in this minute and ends in the next
    reserve("alice", slow, 1, 1, now=now)
    start = int(now // 7 * 7)
    assert used(f"rps#alice#{MODEL}#{start}") == 1
    assert used(f"tpm#alice#{MODEL}#{int(now) // 60}", f"requests_{start}") == 0
    with pytest.raises(RateLimitError):  # in the next minute, the same window refuses
        reserve("alice", slow, 1, 1, now=start + 6.5)


def test_a_fractional_rate_is_one_request_per_longer_window(aws: None) -> None:
    slow = endpoint(requests_per_second_per_user=0.25, tokens_per_minute_per_user=0)
    reserve("alice", slow, 1, 1, now=T0 + 0.5)
    with pytest.raises(RateLimitError) as refused:
        reserve("alice", slow, 1, 1, now=T0 + 1.5)
    assert refused.value.headers["retry-after"] == "3"  # the 4 s window ends at T0 + 4
    reserve("alice", slow, 1, 1, now=T0 + 4.0)


@pytest.mark.parametrize(
    ("window_end", "now", "expected"),
    [(T0 + 60, T0 + 15.5, 45), (T0 + 60, T0 + 59.99, 1), (T0 + 1, T0 + 0.0, 1), (T0, T0 + 3, 1)],
)
def test_retry_after_is_whole_seconds_to_the_next_window(
    window_end: float, now: float, expected: int
) -> None:
    assert retry_after(window_end, now) == expected


def test_tokens_per_minute_reserved_up_front_then_settled_to_the_real_use(aws: None) -> None:
    limited = endpoint(tokens_per_minute_per_user=300, requests_per_second_per_user=0)
    key = f"tpm#alice#{MODEL}#{int(T0) // 60}"
    first = reserve("alice", limited, 40, 200, now=T0 + 1)
    assert first.tokens == 240 and used(key) == 240
    with pytest.raises(RateLimitError) as refused:
        reserve("alice", limited, 40, 100, now=T0 + 15.2)
    assert refused.value.headers["retry-after"] == "45"
    assert used(key) == 240  # the refused reservation took nothing
    # The first request used less than it reserved: the difference goes back to the window.
    settle(first.to_json(), actual_tokens=90)
    assert used(key) == 90
    second = reserve("alice", limited, 40, 100, now=T0 + 20)
    assert used(key) == 230
    # A request may use more than it reserved (a prompt under-estimated): charged the same way.
    settle(second.to_json(), actual_tokens=160)
    assert used(key) == 250
    # The next minute starts empty.
    reserve("alice", limited, 40, 200, now=T0 + 60)
    assert used(f"tpm#alice#{MODEL}#{int(T0) // 60 + 1}") == 240


def test_negative_usage_never_credits_the_counter(aws: None) -> None:
    limited = endpoint(tokens_per_minute_per_user=300, requests_per_second_per_user=0)
    key = f"tpm#alice#{MODEL}#{int(T0) // 60}"
    first = reserve("alice", limited, 40, 200, now=T0 + 1)
    assert used(key) == 240
    # Settled as if nothing was used: the reservation goes back, not a token more.
    settle(first.to_json(), actual_tokens=-1000)
    assert used(key) == 0
    second = reserve("alice", limited, 40, 60, now=T0 + 2)
    assert used(key) == 100
    charge(second.to_json(), -1000)  # a late charge only ever adds
    assert used(key) == 100
    charge(second.to_json(), 5)
    assert used(key) == 105


def test_a_request_larger_than_the_limit_is_refused_without_retry_after(aws: None) -> None:
    limited = endpoint(tokens_per_minute_per_user=300, requests_per_second_per_user=0)
    with pytest.raises(RateLimitError) as refused:
        reserve("alice", limited, 40, 1000, now=T0)
    assert refused.value.code == "request_too_large"
    assert "retry-after" not in refused.value.headers
    assert used(f"tpm#alice#{MODEL}#{int(T0) // 60}") == 0


def test_without_max_tokens_the_cap_is_reserved_when_the_window_has_room(aws: None) -> None:
    limited = endpoint(tokens_per_minute_per_user=10_000, requests_per_second_per_user=0)
    reservation = reserve("alice", limited, 40, 2048, fit=True, now=T0)
    assert (reservation.max_tokens, reservation.tokens) == (2048, 40 + 2048)
    assert used(f"tpm#alice#{MODEL}#{int(T0) // 60}") == 40 + 2048


def test_without_max_tokens_a_request_gets_what_the_window_has_left(aws: None) -> None:
    limited = endpoint(tokens_per_minute_per_user=300, requests_per_second_per_user=0)
    key = f"tpm#alice#{MODEL}#{int(T0) // 60}"
    # Never more than the limit allows at all (the prompt's estimate included), times n.
    first = reserve("alice", limited, 40, 2048, choices=2, fit=True, now=T0)
    assert (first.max_tokens, first.tokens) == (130, 300)
    settle(first.to_json(), actual_tokens=100)  # it used less: 200 left
    second = reserve("alice", limited, 40, 2048, fit=True, now=T0 + 1)
    assert (second.max_tokens, second.tokens) == (160, 200)
    assert used(key) == 300
    with pytest.raises(RateLimitError) as refused:
        reserve("alice", limited, 40, 2048, fit=True, now=T0 + 2)
    assert refused.value.status == 429 and refused.value.headers["retry-after"] == "58"
    assert used(key) == 300  # nothing taken by the refusal


def test_without_max_tokens_a_prompt_over_the_limit_is_too_large(aws: None) -> None:
    limited = endpoint(tokens_per_minute_per_user=300, requests_per_second_per_user=0)
    with pytest.raises(RateLimitError) as refused:
        reserve("alice", limited, 300, 2048, fit=True, now=T0)
    assert refused.value.code == "request_too_large"


def test_concurrent_requests_without_max_tokens_share_the_window_and_never_pass_it(
    atomic_moto: None,
) -> None:
    limited = endpoint(tokens_per_minute_per_user=5_000, requests_per_second_per_user=0)
    key = f"tpm#alice#{MODEL}#{int(T0) // 60}"
    assert used(key) == 0
    start = threading.Barrier(20)

    def racer(_: int) -> int | None:
        start.wait()
        try:
            reservation = reserve("alice", limited, 50, 1000, fit=True, now=T0)
        except RateLimitError:
            return None
        assert reservation.max_tokens is not None and 1 <= reservation.max_tokens <= 1000
        return reservation.tokens

    with ThreadPoolExecutor(max_workers=20) as pool:
        granted = [t for t in pool.map(racer, range(20)) if t is not None]

    assert sum(granted) == used(key) <= 5_000
    assert len(granted) >= 5  # at least the five full reservations fit


def test_a_later_limit_refusing_gives_the_earlier_tokens_back(aws: None) -> None:
    limited = endpoint(
        tokens_per_minute_per_user=1000, tokens_per_minute=500, requests_per_second_per_user=10
    )
    minute = int(T0) // 60
    reserve("alice", limited, 50, 350, now=T0)  # 400 on both token counters
    with pytest.raises(RateLimitError) as refused:
        reserve("bob", limited, 50, 150, now=T0 + 1)  # fits bob's own, not the endpoint's
    assert "for this endpoint" in refused.value.message
    assert used(f"tpm#bob#{MODEL}#{minute}") == 0
    assert used(f"tpmm#polaris#{MODEL}#{minute}") == 400
    assert requests_used("bob", MODEL, int(T0) + 1) == 1  # the request itself was made


def test_limits_default_to_the_settings_where_the_registry_names_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = get_settings()
    monkeypatch.setattr(settings, "default_requests_per_second_per_user", 5.0)
    monkeypatch.setattr(settings, "default_tokens_per_minute_per_user", 1234)
    monkeypatch.setattr(settings, "default_tokens_per_minute", 0)
    assert ratelimit.limits_for(endpoint()) == ratelimit.EffectiveLimits(5.0, 1234, None)
    assert ratelimit.limits_for(
        endpoint(requests_per_second_per_user=2, tokens_per_minute=99)
    ) == ratelimit.EffectiveLimits(2, 1234, 99)
    # 0 in the registry switches a limit off for that endpoint.
    switched_off = ratelimit.limits_for(endpoint(tokens_per_minute_per_user=0))
    assert switched_off.tokens_per_minute_per_user is None
