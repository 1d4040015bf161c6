"""A batch takes its tokens from its owner's per-minute budget as it runs (`tokens` events on the
batch callback, first_core.batches.budget): granted from the same counters as interactive
requests, waited for when the minute has too few, settled once with what the lines used."""

from __future__ import annotations

import time

import pytest

from first_core import ratelimit
from first_core.batches import lifecycle
from first_core.errors import RateLimitError
from first_core.registry import Registry
from first_core.settings import get_settings
from first_core.tables import BatchRecord
from tests.support.batches import MODEL, call_back, create, load, upload
from tests.support.compute import FakeBackend
from tests.support.identities import CALLER

LIMIT = 1000


@pytest.fixture
def batch_id(backend: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(get_settings(), "default_tokens_per_minute_per_user", LIMIT)
    return create(upload().file_id)


def used_now() -> int:
    return ratelimit.used(f"tpm#{CALLER.user_id}#{MODEL}#{int(time.time() // 60)}")


def test_a_batch_and_an_interactive_request_share_the_owners_minute(batch_id: str) -> None:
    call_back(batch_id, "tokens", want=700)
    endpoint = next(e for e in Registry.current().endpoints if e.model == MODEL)
    with pytest.raises(RateLimitError):
        ratelimit.reserve(CALLER.user_id, endpoint, 100, 300)
    ratelimit.reserve(CALLER.user_id, endpoint, 100, 200)
    assert used_now() == LIMIT


def test_tokens_are_granted_from_the_owners_minute_and_settled_once(batch_id: str) -> None:
    reply = call_back(batch_id, "tokens", want=600)
    assert reply == {"continue": True, "granted": 600, "limit": LIMIT}
    assert used_now() == 600 and load(batch_id).tokens_granted == 600

    # The lines used 250: the rest comes back, once however often the settle is repeated.
    assert call_back(batch_id, "tokens", used=250) == {"continue": True, "granted": 0}
    call_back(batch_id, "tokens", used=0)
    assert used_now() == 250 and load(batch_id).token_grant is None


def test_more_than_the_minute_has_left_is_waited_for(batch_id: str) -> None:
    call_back(batch_id, "tokens", want=900)

    reply = call_back(batch_id, "tokens", want=300)

    assert reply["granted"] == 0 and 1 <= reply["retry_in"] <= 60
    assert used_now() == 900  # nothing taken by the refusal
    assert load(batch_id).waiting_for_tokens_at is not None
    # Once the first grant is settled (all used), what is left is granted.
    call_back(batch_id, "tokens", used=900, want=50)
    assert load(batch_id).waiting_for_tokens_at is None and used_now() == 950


def test_more_than_a_whole_minute_allows_says_the_limit(batch_id: str) -> None:
    assert call_back(batch_id, "tokens", want=LIMIT + 1) == {
        "continue": True,
        "granted": 0,
        "limit": LIMIT,
    }
    assert used_now() == 0


def test_a_settle_can_give_back_no_more_than_was_granted(batch_id: str) -> None:
    call_back(batch_id, "tokens", want=100)
    call_back(batch_id, "tokens", used=0)
    # A forged or repeated settle names no grant the gateway holds: nothing is given back.
    call_back(batch_id, "tokens", used=0)
    assert used_now() == 0
    call_back(batch_id, "tokens", want=400)
    assert used_now() == 400


def test_an_ended_batch_is_granted_nothing(batch_id: str) -> None:
    lifecycle.cancel(load(batch_id))

    assert call_back(batch_id, "tokens", want=10) == {"continue": False}
    assert used_now() == 0


def test_an_old_attempt_is_granted_nothing(batch_id: str) -> None:
    record = load(batch_id)
    record.update(actions=[BatchRecord.attempt.set(2)])

    assert call_back(batch_id, "tokens", attempt=1, want=10) == {"continue": False}
    assert call_back(batch_id, "tokens", attempt=2, want=10)["granted"] == 10


def test_a_batch_being_cancelled_settles_its_grant_and_is_told_to_stop(batch_id: str) -> None:
    call_back(batch_id, "tokens", want=500)
    lifecycle.cancel(load(batch_id))

    assert call_back(batch_id, "tokens", used=100, want=500) == {"continue": False}
    assert used_now() == 100
