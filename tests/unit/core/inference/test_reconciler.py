"""The reconciler against a fake compute backend, on in-process moto."""

from __future__ import annotations

import json
import time

import pytest

from first_core.compute import TaskState
from first_core.inference import reconciler, records, results, stream_sink
from first_core.schemas import wire
from first_core.settings import get_settings
from first_core.tables import RequestRecord, StreamChunkBatch, UsageRecord
from tests.support.compute import FakeBackend
from tests.support.identities import CALLER
from tests.support.registry import ENDPOINT

pytestmark = pytest.mark.usefixtures("aws")

ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


def new_request(task_id: str | None, *, stream: bool = False) -> str:
    request_id = records.new_request_id()
    records.create(request_id, CALLER, ENDPOINT, "chat/completions", stream, "test")
    if task_id:
        records.set_task(request_id, task_id)
    return request_id


def status(request_id: str) -> RequestRecord:
    return RequestRecord.get(request_id, consistent_read=True)


def run(backend: FakeBackend, now: float | None = None) -> reconciler.ReconcileReport:
    report = reconciler.reconcile(now=(now or time.time()) + 10, grace_seconds=5, backend=backend)
    assert backend.submits == [], "the reconciler never submits"
    return report


def usage_rows() -> list[UsageRecord]:
    return list(UsageRecord.scan())


def test_a_lost_callback_is_recovered_once() -> None:
    request_id = new_request("t1")
    value = {"request_id": request_id, "status_code": 200, "body": ANSWER}
    backend = FakeBackend({"t1": TaskState("success", result=value)})
    report = run(backend)
    assert report.completed == [request_id]
    record = status(request_id)
    assert (record.status, record.total_tokens, record.open_status) == ("completed", 5, None)
    stored = results.load(request_id)
    assert stored is not None and stored.body == ANSWER
    # Ended requests leave the open index: a second run does not even look at them.
    assert run(backend).checked == 0
    # A late callback changes nothing: one result, one usage record.
    assert results.record(request_id, 200, ANSWER) == "duplicate"
    assert len(usage_rows()) == 1


def test_young_requests_are_left_alone() -> None:
    new_request("t1")
    backend = FakeBackend({})
    assert reconciler.reconcile(grace_seconds=60, backend=backend).checked == 0
    assert backend.asked == []


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (TaskState("failed", error="RuntimeError: boom"), "boom"),
        (TaskState("unknown", error="gone"), "vanished"),
    ],
)
def test_failed_or_vanished_tasks_end_failed_with_the_reason(state: TaskState, reason: str) -> None:
    request_id = new_request("t1")
    report = run(FakeBackend({"t1": state}))
    assert report.failed == [request_id]
    record = status(request_id)
    assert record.status == "failed" and reason in (record.error or "")
    stored = results.load(request_id)  # a client still waiting gets the error at once
    assert stored is not None and stored.status_code == 502
    assert "error" in stored.body


def test_never_submitted_requests_fail_once_the_proxys_wait_is_over() -> None:
    request_id = new_request(None)
    # Within the proxy's wait the task id may still be on its way (a throttled write).
    assert run(FakeBackend({})).pending == [request_id]
    assert status(request_id).status == "submitted"
    later = time.time() + get_settings().result_wait_seconds + 1
    reconciler.reconcile(now=later, grace_seconds=5, backend=FakeBackend({}))
    record = status(request_id)
    assert record.status == "failed" and "never submitted" in (record.error or "")


def test_pending_tasks_wait_until_the_deadline_then_time_out() -> None:
    request_id = new_request("t1")
    backend = FakeBackend({"t1": TaskState("pending")})
    assert run(backend).pending == [request_id]
    assert status(request_id).status == "submitted"
    report = reconciler.reconcile(now=time.time() + 7 * 3600, grace_seconds=5, backend=backend)
    assert report.timed_out == [request_id]
    assert status(request_id).status == "timed_out"
    assert len(usage_rows()) == 1


def chunk(content: str) -> str:
    return json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": content}}]})


def test_a_stream_with_lost_batches_is_completed_in_order() -> None:
    request_id = new_request("t1", stream=True)
    chunks = [chunk(word) for word in ("a", "b", "c", "d", "e", "f")]
    # Batch 0 (a) and batch 2 (d, e) landed; batch 1 (b, c) and the done batch (f) were lost.
    for seq, part in ((0, chunks[:1]), (2, chunks[3:5])):
        batch = wire.StreamBatchBody(request_id=request_id, seq=seq, chunks=part)
        stream_sink.put_batch(request_id, batch)
    value = {
        "request_id": request_id,
        "status_code": 200,
        "body": {},
        "chunks": chunks,
        "usage": {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7},
    }
    run(FakeBackend({"t1": TaskState("success", result=value)}))
    rows = sorted(StreamChunkBatch.query(request_id), key=lambda r: int(r.seq))
    assert [int(r.seq) for r in rows] == [0, 1, 2, 3]
    assert [c for r in rows for c in r.chunks] == chunks
    assert [bool(r.done) for r in rows] == [False, False, False, True]
    record = status(request_id)
    assert (record.status, record.total_tokens) == ("completed", 7)


def test_a_failed_stream_task_ends_with_an_error_batch() -> None:
    request_id = new_request("t1", stream=True)
    run(FakeBackend({"t1": TaskState("failed", error="boom")}))
    [row] = list(StreamChunkBatch.query(request_id))
    assert row.done and json.loads(row.chunks[-1])["error"]["message"].endswith("boom")
    assert status(request_id).status == "failed"


def test_a_done_batch_after_a_lost_one_waits_for_the_reconciler_to_fill_the_gap() -> None:
    from first_core.callbacks import callback_token

    request_id = new_request("t1", stream=True)
    chunks = [chunk(word) for word in ("a", "b", "c")]
    usage = {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}

    def post(seq: int, part: list[str], done: bool = False) -> None:
        body = {
            "request_id": request_id,
            "seq": seq,
            "chunks": part,
            "done": done,
            "usage": usage if done else None,
        }
        stream_sink.accept_stream_callback(
            request_id, f"Bearer {callback_token(request_id)}", json.dumps(body).encode()
        )

    post(0, chunks[:1])
    post(2, chunks[2:], done=True)  # batch 1 was lost
    assert status(request_id).status == "submitted"  # not ended over a hole
    value = {"status_code": 200, "body": {}, "chunks": chunks, "usage": usage}
    run(FakeBackend({"t1": TaskState("success", result=value)}))
    rows = sorted(StreamChunkBatch.query(request_id), key=lambda r: int(r.seq))
    assert [c for r in rows for c in r.chunks] == chunks
    record = status(request_id)
    assert (record.status, record.total_tokens) == ("completed", 4)
    assert len(usage_rows()) == 1


# -- a task's return value is checked as its callback would have been ---------------------------
def bounded_request(task_id: str, *, stream: bool = False) -> str:
    """Sent with max_tokens 5, n 1 and a 100-byte body."""
    request_id = records.new_request_id()
    records.create(
        request_id,
        CALLER,
        ENDPOINT,
        "chat/completions",
        stream,
        "test",
        max_tokens=5,
        prompt_bytes=100,
    )
    records.set_task(request_id, task_id)
    return request_id


def test_an_answer_over_the_cap_ends_the_request_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "max_payload_bytes", 1000)
    request_id = bounded_request("t1")
    huge = {**ANSWER, "data": [{"embedding": [0.125] * 500}]}  # a small request, a big answer
    value = {"request_id": request_id, "status_code": 200, "body": huge}

    report = run(FakeBackend({"t1": TaskState("success", result=value)}))

    assert report.failed == [request_id] and report.completed == []
    stored = results.load(request_id)  # the client still waiting gets a clear error
    assert stored is not None and stored.status_code == 502
    assert set(stored.body["error"]) == {"message", "type", "param", "code"}
    assert stored.body["error"]["code"] == "result_too_large"
    assert "limit of 1000 bytes" in stored.body["error"]["message"]
    record = status(request_id)
    assert record.status == "failed" and "limit of 1000 bytes" in (record.error or "")
    [row] = usage_rows()  # settled as any failure
    assert (row.status, row.total_tokens) == ("failed", 0)


def test_a_stream_over_the_cap_ends_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "max_payload_bytes", 1000)
    request_id = bounded_request("t1", stream=True)
    chunks = [chunk("x" * 100) for _ in range(20)]
    value = {"request_id": request_id, "status_code": 200, "body": {}, "chunks": chunks}

    assert run(FakeBackend({"t1": TaskState("success", result=value)})).failed == [request_id]

    [row] = list(StreamChunkBatch.query(request_id))
    assert row.done and json.loads(row.chunks[-1])["error"]["code"] == "result_too_large"
    assert status(request_id).status == "failed"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"status_code": 600, "body": ANSWER}, "result.status_code"),
        ({"status_code": "200", "body": ANSWER}, "result.status_code"),
        ({"status_code": 200, "body": {**ANSWER, "usage": {"prompt_tokens": -3}}}, "usage"),
        ({"status_code": 200, "body": {**ANSWER, "usage": {"completion_tokens": 6}}}, "max_tokens"),
        ({"status_code": 200, "body": {**ANSWER, "usage": {"prompt_tokens": 10**40}}}, "usage"),
    ],
    ids=["status-600", "status-string", "negative-usage", "over-max-tokens", "giant-usage"],
)
def test_a_result_out_of_range_ends_the_request_failed_saying_why(
    value: dict[str, object], reason: str
) -> None:
    request_id = bounded_request("t1")
    report = run(FakeBackend({"t1": TaskState("success", result=value)}))
    assert report.failed == [request_id] and report.errors == []
    record = status(request_id)
    assert record.status == "failed" and reason in (record.error or "")
    assert record.total_tokens is None
    stored = results.load(request_id)
    assert stored is not None and stored.body["error"]["code"] == "invalid_result"


def test_a_stream_result_with_usage_out_of_range_ends_failed() -> None:
    request_id = bounded_request("t1", stream=True)
    usage = {"prompt_tokens": 1, "completion_tokens": -6, "total_tokens": -5}
    value = {"status_code": 200, "body": {}, "chunks": [chunk("a")], "usage": usage}
    report = run(FakeBackend({"t1": TaskState("success", result=value)}))
    assert report.failed == [request_id] and report.errors == []
    record = status(request_id)
    assert record.status == "failed" and record.total_tokens is None


def test_a_whole_lost_stream_is_put_back_in_batches_that_fit_an_item() -> None:
    request_id = new_request("t1", stream=True)
    chunks = [chunk(f"{i:03d}" + "y" * 50_000) for i in range(20)]  # 1 MB, every batch lost
    usage = {"prompt_tokens": 1, "completion_tokens": 20, "total_tokens": 21}
    value = {"status_code": 200, "body": {}, "chunks": chunks, "usage": usage}
    assert run(FakeBackend({"t1": TaskState("success", result=value)})).errors == []
    rows = sorted(StreamChunkBatch.query(request_id), key=lambda r: int(r.seq))
    assert len(rows) > 3
    assert all(len(json.dumps(r.chunks)) <= get_settings().inline_result_bytes for r in rows)
    assert [c for r in rows for c in r.chunks] == chunks
    assert [bool(r.done) for r in rows] == [False] * (len(rows) - 1) + [True]
    assert status(request_id).status == "completed"
