"""Usage records: exactly one per request however its end is reached, their timings, the
rate-limit settlement at the end, and the totals `GET /v1/usage` reports."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest

from first_core import ratelimit, usage
from first_core.auth import Caller
from first_core.callbacks import callback_token
from first_core.errors import InvalidRequestError, PermissionDeniedError
from first_core.inference import records, stream_sink
from first_core.inference.results import record
from first_core.registry import Endpoint, FunctionIds, Limits
from first_core.settings import get_settings
from first_core.tables import RequestRecord, StreamChunkBatch, UsageRecord
from first_core.usage import Usage

ADMIN_GROUP = "admins-group-id"


def caller(name: str, *, admin: bool = False) -> Caller:
    return Caller(
        user_id=f"{name}-id",
        username=f"{name}@anl.gov",
        name=name.title(),
        email=f"{name}@anl.gov",
        idp_domain="anl.gov",
        idp_name="Argonne",
        groups=frozenset({ADMIN_GROUP} if admin else set()),
    )


ALICE, BOB, DAVE = caller("alice"), caller("bob"), caller("dave", admin=True)


def endpoint(model: str = "meta-llama/Meta-Llama-3-8B-Instruct", **limits: Any) -> Endpoint:
    return Endpoint(
        cluster="sophia",
        framework="vllm",
        model=model,
        endpoint_id="local-sophia-vllm",
        functions=FunctionIds(inference="local:inference", streaming="local:streaming"),
        limits=Limits(**limits),
        allowed_groups=[],
        status="online",
    )


@pytest.fixture(autouse=True)
def _admins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "admin_groups", [ADMIN_GROUP])


def start(
    who: Caller = ALICE,
    *,
    stream: bool = False,
    created_at: float | None = None,
    model: str = "meta-llama/Meta-Llama-3-8B-Instruct",
    reservation: dict[str, Any] | None = None,
) -> str:
    request_id = records.new_request_id()
    records.create(
        request_id, who, endpoint(model), "chat/completions", stream, "only", reservation
    )
    if created_at is not None:
        RequestRecord(request_id).update(actions=[RequestRecord.created_at.set(created_at)])
    return request_id


def usage_rows(who: Caller = ALICE) -> list[UsageRecord]:
    return list(UsageRecord.query(who.user_id, consistent_read=True))


def answer(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    }


def test_a_completed_request_has_one_usage_record_with_its_tokens_and_timings(aws: None) -> None:
    request_id = start()
    assert record(request_id, 200, answer(12, 30)) == "written"
    (row,) = usage_rows()
    stored = RequestRecord.get(request_id)
    assert (row.request_id, row.status, row.model, row.cluster) == (
        request_id, "completed", "meta-llama/Meta-Llama-3-8B-Instruct", "sophia"
    )
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (12, 30, 42)
    assert row.username == "alice@anl.gov"
    assert row.date == datetime.fromtimestamp(stored.created_at, tz=UTC).strftime("%Y-%m-%d")
    assert row.sk.endswith(f"#{request_id}") and row.sk.startswith(row.date)
    assert row.total_ms == round((stored.completed_at - stored.created_at) * 1000)
    assert row.queued_ms is not None and 0 <= row.queued_ms <= row.total_ms
    assert row.first_token_ms is None  # not streamed


def test_a_repeated_finish_writes_no_second_usage_record(aws: None) -> None:
    request_id = start()
    assert records.finish(request_id, "completed", usage=Usage(1, 2, 3))
    assert not records.finish(request_id, "failed", error="late")
    record(request_id, 200, answer(5, 5))  # a callback for the ended request
    # Even the write itself, run again (say, by a retry after a crash), is a no-op.
    assert not usage.write_record(RequestRecord.get(request_id, consistent_read=True))
    (row,) = usage_rows()
    assert (row.status, row.total_tokens) == ("completed", 3)


@pytest.mark.usefixtures("atomic_moto")
def test_concurrent_ends_of_one_request_make_exactly_one_usage_record(aws: None) -> None:
    request_id = start()
    statuses = ["completed", "failed", "cancelled", "timed_out"] * 4
    gate = threading.Barrier(len(statuses))

    def end(status: str) -> bool:
        gate.wait()
        return records.finish(request_id, status, usage=Usage(1, 1, 2))

    with ThreadPoolExecutor(max_workers=len(statuses)) as pool:
        outcomes = list(pool.map(end, statuses))
    assert outcomes.count(True) == 1
    (row,) = usage_rows()
    assert row.status == RequestRecord.get(request_id, consistent_read=True).status


@pytest.mark.parametrize("status", ["failed", "cancelled", "timed_out"])
def test_requests_that_do_not_complete_have_a_usage_record_too(aws: None, status: str) -> None:
    request_id = start()
    assert records.finish(request_id, status, error="something" if status == "failed" else None)
    (row,) = usage_rows()
    assert (row.request_id, row.status, row.total_tokens) == (request_id, status, 0)


def test_a_streamed_request_records_its_first_token_time(aws: None) -> None:
    request_id = start(stream=True)
    created = float(RequestRecord.get(request_id).created_at)
    StreamChunkBatch(request_id, 0, chunks=["{}"], created_at=created + 0.25,
                     expires_at=datetime.fromtimestamp(created + 60, tz=UTC)).save()
    assert records.finish(request_id, "completed", usage=Usage(4, 6, 10))
    (row,) = usage_rows()
    assert row.stream is True
    assert row.first_token_ms == row.queued_ms == 250
    assert row.total_tokens == 10


def test_a_cancelled_streams_late_usage_reaches_its_usage_record_and_rate_window(
    aws: None,
) -> None:
    limited = endpoint("meta-llama/Llama-3.2-1B-Instruct", tokens_per_minute_per_user=1000)
    reservation = ratelimit.reserve(ALICE.user_id, limited, 20, 100)
    key = reservation.counters[0].key
    request_id = start(stream=True, model=limited.model, reservation=reservation.to_json())
    assert ratelimit.used(key) == 120
    stream_sink.cancel(request_id)  # the client went away
    assert ratelimit.used(key) == 0  # nothing used yet: all given back
    (row,) = usage_rows()
    assert (row.status, row.total_tokens) == ("cancelled", 0)
    # The compute function's last batch still carries what was generated, which is billed.
    body = {"request_id": request_id, "seq": 3, "done": True,
            "usage": {"prompt_tokens": 20, "completion_tokens": 35}}
    reply = stream_sink.accept_stream_callback(
        request_id, f"Bearer {callback_token(request_id)}", json.dumps(body).encode()
    )
    assert reply["continue"] is False
    stream_sink.accept_stream_callback(  # a repeat changes nothing
        request_id, f"Bearer {callback_token(request_id)}", json.dumps(body).encode()
    )
    (row,) = usage_rows()
    assert (row.status, row.prompt_tokens, row.completion_tokens, row.total_tokens) == (
        "cancelled", 20, 35, 55
    )
    assert ratelimit.used(key) == 55


def test_the_end_of_a_request_settles_its_reservation_to_the_real_use(aws: None) -> None:
    limited = endpoint("meta-llama/Llama-3.2-1B-Instruct", tokens_per_minute_per_user=1000)
    reservation = ratelimit.reserve(ALICE.user_id, limited, 50, 500)
    key = reservation.counters[0].key
    request_id = start(model=limited.model, reservation=reservation.to_json())
    assert ratelimit.used(key) == 550
    assert record(request_id, 200, answer(30, 70)) == "written"
    assert ratelimit.used(key) == 100
    assert record(request_id, 200, answer(30, 70)) == "duplicate"
    assert ratelimit.used(key) == 100  # settled once


def _day(day: str, hour: int = 12) -> float:
    return datetime.fromisoformat(f"{day}T{hour:02d}:00:00+00:00").timestamp()


def _history() -> None:
    """alice: two days, two models, every status; bob: one request."""
    small = "meta-llama/Llama-3.2-1B-Instruct"
    for day, model, status, tokens in [
        ("2026-11-26", small, "completed", (10, 20)),
        ("2026-11-27", small, "completed", (10, 5)),
        ("2026-11-27", small, "completed", (7, 3)),
        ("2026-11-27", small, "failed", None),
        ("2026-11-27", "meta-llama/Meta-Llama-3-8B-Instruct", "completed", (1, 1)),
        ("2026-11-27", "meta-llama/Meta-Llama-3-8B-Instruct", "cancelled", None),
        ("2026-11-28", small, "timed_out", None),
    ]:
        request_id = start(created_at=_day(day), model=model)
        used = Usage(tokens[0], tokens[1], sum(tokens)) if tokens else None
        assert records.finish(request_id, status, usage=used)
    bob_request = start(BOB, created_at=_day("2026-11-27", 23), model=small)
    assert records.finish(bob_request, "completed", usage=Usage(100, 100, 200))


def test_usage_totals_by_day_and_model_for_the_caller(aws: None) -> None:
    _history()
    report = usage.report(ALICE, start_date="2026-11-26", end_date="2026-11-27")
    assert report["object"] == "list" and report["user"] == ALICE.user_id
    assert report["data"] == [
        {"date": "2026-11-26", "model": "meta-llama/Llama-3.2-1B-Instruct", "requests": 1,
         "prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30,
         "by_status": {"completed": 1}},
        {"date": "2026-11-27", "model": "meta-llama/Llama-3.2-1B-Instruct", "requests": 3,
         "prompt_tokens": 17, "completion_tokens": 8, "total_tokens": 25,
         "by_status": {"completed": 2, "failed": 1}},
        {"date": "2026-11-27", "model": "meta-llama/Meta-Llama-3-8B-Instruct", "requests": 2,
         "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
         "by_status": {"completed": 1, "cancelled": 1}},
    ]
    only_last_day = usage.report(ALICE, start_date="2026-11-28", end_date="2026-11-28")
    assert [(r["date"], r["by_status"]) for r in only_last_day["data"]] == [
        ("2026-11-28", {"timed_out": 1})
    ]
    assert usage.report(BOB, start_date="2026-11-01", end_date="2026-11-30")["data"][0][
        "total_tokens"
    ] == 200


def test_only_admins_see_other_users_usage(aws: None) -> None:
    _history()
    with pytest.raises(PermissionDeniedError):
        usage.report(ALICE, user="all")
    with pytest.raises(PermissionDeniedError):
        usage.report(ALICE, user=BOB.user_id)
    assert usage.report(ALICE, user=ALICE.user_id, start_date="2026-11-26")["data"]
    everyone = usage.report(DAVE, user="all", start_date="2026-11-27", end_date="2026-11-27")
    by_user = {(r["username"], r["model"]): r["total_tokens"] for r in everyone["data"]}
    assert by_user == {
        ("alice@anl.gov", "meta-llama/Llama-3.2-1B-Instruct"): 25,
        ("alice@anl.gov", "meta-llama/Meta-Llama-3-8B-Instruct"): 2,
        ("bob@anl.gov", "meta-llama/Llama-3.2-1B-Instruct"): 200,
    }
    one = usage.report(DAVE, user=BOB.user_id, start_date="2026-11-20", end_date="2026-11-28")
    assert [(r["date"], r["requests"]) for r in one["data"]] == [("2026-11-27", 1)]


@pytest.mark.parametrize(
    ("start_date", "end_date"),
    [("yesterday", None), ("2026-11-28", "2026-11-01"), ("2024-01-01", "2026-11-28")],
)
def test_bad_date_ranges_are_400s(aws: None, start_date: str, end_date: str | None) -> None:
    with pytest.raises(InvalidRequestError):
        usage.report(ALICE, start_date=start_date, end_date=end_date)
