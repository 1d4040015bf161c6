"""The Globus Compute API budget: one counter per window in DynamoDB, shared by every caller,
with the submitter's reserve, and never more than the service's limit in any sliding window."""

from __future__ import annotations

import time
from collections import deque

import pytest

from first_core.compute import budget
from first_core.settings import get_settings
from first_local.compute_standin.limits import ApiLimit

pytestmark = pytest.mark.usefixtures("aws")

WINDOW = 2.0


@pytest.fixture(autouse=True)
def three_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    monkeypatch.setattr(settings, "compute_api_calls_per_window", 3)
    monkeypatch.setattr(settings, "compute_api_window_seconds", WINDOW)
    monkeypatch.setattr(settings, "compute_api_queue_reserve", 1)


def window_start() -> float:
    return (time.time() // WINDOW + 1) * WINDOW  # a fresh window, a little in the future


def takes(level: budget.Priority, now: float, n: int) -> list[bool]:
    with budget.priority(level):
        return [budget.try_take(now) == 0.0 for _ in range(n)]


def test_requests_submitted_at_once_leave_the_last_unit_to_the_submitter() -> None:
    start = window_start()
    assert takes(budget.Priority.SUBMIT_NOW, start, 3) == [True, True, False]
    assert takes(budget.Priority.SUBMITTER, start, 2) == [True, False]
    # The next window is new.
    assert takes(budget.Priority.SUBMIT_NOW, start + WINDOW, 1) == [True]


def test_background_work_shares_what_users_leave_and_never_the_reserve() -> None:
    start = window_start()
    assert takes(budget.Priority.BACKGROUND, start, 1) == [True]
    assert takes(budget.Priority.SUBMIT_NOW, start, 2) == [True, False]
    assert takes(budget.Priority.BACKGROUND, start, 1) == [False]
    assert takes(budget.Priority.SUBMITTER, start, 1) == [True]


def test_a_refused_take_says_how_long_until_the_next_window() -> None:
    start = window_start()
    takes(budget.Priority.SUBMITTER, start, 3)
    with budget.priority(budget.Priority.SUBMITTER):
        assert budget.try_take(start + 0.5) == pytest.approx(WINDOW - 0.5)


def test_spend_at_once_raises_for_the_queue_and_background_waits_for_a_window() -> None:
    while time.time() % WINDOW > WINDOW / 2:  # all three takes in one window
        time.sleep(0.05)
    now = time.time()
    with budget.priority(budget.Priority.SUBMIT_NOW):
        budget.spend(wait=0)
        budget.spend(wait=0)
        with pytest.raises(budget.BudgetExhausted) as exhausted:
            budget.spend(wait=0)
    assert exhausted.value.status == 503 and exhausted.value.headers["Retry-After"]
    with budget.priority(budget.Priority.BACKGROUND):
        budget.spend()  # waits into the next window
    assert time.time() - now < 3 * WINDOW


class FrozenClock:
    """`time` for the budget module, with the wall clock stopped in the middle of a window."""

    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)

    def __init__(self) -> None:
        self.now = window_start() + WINDOW / 2

    def time(self) -> float:
        return self.now


def test_a_prepaid_call_takes_nothing_more(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget, "time", FrozenClock())
    with budget.priority(budget.Priority.SUBMIT_NOW):
        budget.spend(wait=0)
        with budget.prepaid():
            budget.spend(wait=0)  # the unit taken above
        budget.spend(wait=0)
        with pytest.raises(budget.BudgetExhausted):
            budget.spend(wait=0)


def test_no_budget_means_every_call_goes_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "compute_api_calls_per_window", 0)
    for _ in range(50):
        budget.spend(wait=0)


@pytest.mark.parametrize("limit", ["20/10", "5/2", "100/60", "3/1"])
def test_the_stacks_budget_never_exceeds_the_limit_in_any_sliding_window(limit: str) -> None:
    """Every unit taken, at the worst moments (all at the start or end of each fixed window),
    never puts more than the service's limit into any sliding window of its length."""
    service = ApiLimit.parse(limit)
    calls, window = service.budget()
    assert calls >= 1
    stamps: list[float] = []
    for index in range(40):
        edge = index * window + (window - 1e-6 if index % 2 else 0.0)
        stamps += [edge] * calls
    recent: deque[float] = deque()
    for stamp in stamps:
        recent.append(stamp)
        while recent[0] <= stamp - service.seconds:
            recent.popleft()
        assert len(recent) <= service.requests, (limit, stamp, len(recent))
    assert ApiLimit.parse("20/10").budget() == (3, 2.0)  # the settings' defaults
