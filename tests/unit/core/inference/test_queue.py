"""The submit queue and its submitter, on in-process moto (DynamoDB, S3, SQS) with the real
`GlobusComputeBackend` sending batches to the Globus Compute stand-in: one call per endpoint
however many requests, a claim per request so none is sent twice, and what happens when the
submitter dies mid-batch."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

import first_core.compute
from compute_funcs.register import make_client
from first_core import inference
from first_core.compute import GlobusComputeBackend, TaskState
from first_core.inference import queue as submit_queue
from first_core.inference import reconciler, records, results
from first_core.registry import Endpoint
from first_core.settings import get_settings
from first_core.tables import RequestRecord
from first_local.provision import TEMPLATE, create_queue
from tests.support.compute import TEST_ENDPOINT_ID, ComputeStandIn, FakeBackend
from tests.support.identities import ALICE, CALLER
from tests.support.registry import ENDPOINT

SUBMIT = "POST /v3/endpoints/{endpoint_id}/submit"


def answer_for(
    payload: dict[str, Any],
    openai_path: str,
    request_id: str,
    callback_url: str,
    callback_token: str,
) -> dict[str, Any]:
    """Stands in for compute_funcs' inference: returns its result (no callback is made)."""
    return {
        "request_id": request_id,
        "status_code": 200,
        "body": {"object": "chat.completion", "echo": payload["messages"][0]["content"]},
    }


class Killed(BaseException):
    pass


@pytest.fixture
def queue(aws: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    settings = get_settings()
    sqs = boto3.client("sqs", region_name=settings.aws_region)
    url = create_queue(sqs, TEMPLATE, "unit-submit", visibility_timeout=0)
    monkeypatch.setattr(settings, "submit_queue_url", url)
    submit_queue.sqs.cache_clear()
    yield url
    submit_queue.sqs.cache_clear()


@pytest.fixture
def function_id(globus_compute: ComputeStandIn) -> str:
    return str(make_client().register_function(answer_for))


def queued_request(function_id: str, text: str = "hi", endpoint_id: str = TEST_ENDPOINT_ID) -> Any:
    request_id = records.new_request_id()
    endpoint = Endpoint(**{**ENDPOINT.model_dump(), "endpoint_id": endpoint_id})
    records.create(request_id, CALLER, endpoint, "chat/completions", False, "test", queued=True)
    payload = {"model": ENDPOINT.model, "messages": [{"role": "user", "content": text}]}
    return submit_queue.QueuedRequest(
        request_id, endpoint_id, function_id, "chat/completions", False, payload
    )


def received(url: str) -> dict[str, str]:
    sqs = submit_queue.sqs()
    messages: dict[str, str] = {}
    for _ in range(5):
        for message in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get(
            "Messages", []
        ):
            messages[message["MessageId"]] = message["Body"]
    return messages


def submits(globus_compute: ComputeStandIn) -> int:
    return int(globus_compute.service.calls()["routes"].get(SUBMIT, 0))


def record(request_id: str) -> RequestRecord:
    return RequestRecord.get(request_id, consistent_read=True)


def test_a_queued_request_carries_its_body_and_no_secret(queue: str) -> None:
    request = queued_request("f0000000-0000-4000-8000-000000000001")
    submit_queue.enqueue(request)

    [body] = received(queue).values()

    message = json.loads(body)
    assert message["request_id"] == request.request_id
    assert message["payload"]["messages"][0]["content"] == "hi"
    assert "callback_token" not in body and "callback_url" not in body
    # The submitter derives them from the request id, as the proxy does.
    kwargs = submit_queue.QueuedRequest.from_message(body).task_kwargs()
    assert kwargs["callback_url"].endswith(f"/callbacks/{request.request_id}")
    assert kwargs["callback_token"]


def test_a_body_too_large_for_a_message_waits_in_s3(queue: str) -> None:
    request = queued_request("f0000000-0000-4000-8000-000000000001", text="x" * 300_000)
    submit_queue.enqueue(request)

    [body] = received(queue).values()

    assert len(body) < 1000 and json.loads(body)["payload_key"].startswith("queued/")
    kwargs = submit_queue.QueuedRequest.from_message(body).task_kwargs()
    assert kwargs["payload"]["messages"][0]["content"] == "x" * 300_000


def test_everything_waiting_for_an_endpoint_goes_in_one_call(
    queue: str, function_id: str, backend: GlobusComputeBackend, globus_compute: ComputeStandIn
) -> None:
    requests = [queued_request(function_id, f"q{i}") for i in range(6)]
    for request in requests:
        submit_queue.enqueue(request)
    before = submits(globus_compute)

    report = submit_queue.submit_waiting(received(queue), backend=backend)

    assert submits(globus_compute) == before + 1 and report.calls == 1
    assert sorted(report.submitted) == sorted(r.request_id for r in requests)
    states = backend.task_states([record(r.request_id).task_id for r in requests])
    deadline = time.monotonic() + 30
    while any(s.status == "pending" for s in states.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
        states = backend.task_states(list(states))
    echoes = {s.result["request_id"]: s.result["body"]["echo"] for s in states.values()}
    assert echoes == {r.request_id: f"q{i}" for i, r in enumerate(requests)}


def test_a_message_delivered_again_sends_nothing_again(
    queue: str, function_id: str, backend: GlobusComputeBackend, globus_compute: ComputeStandIn
) -> None:
    request = queued_request(function_id)
    messages = {"m1": request.to_message()}
    submit_queue.submit_waiting(messages, backend=backend)
    tasks = globus_compute.service.calls()["tasks"]

    again = submit_queue.submit_waiting({"m2": request.to_message()}, backend=backend)

    assert again.skipped == [request.request_id] and again.calls == 0
    assert globus_compute.service.calls()["tasks"] == tasks


def test_a_submitter_killed_after_sending_loses_nothing_and_runs_nothing_twice(
    queue: str,
    function_id: str,
    backend: GlobusComputeBackend,
    globus_compute: ComputeStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requests = [queued_request(function_id, f"k{i}") for i in range(3)]
    messages = {f"m{i}": r.to_message() for i, r in enumerate(requests)}
    tasks_before = globus_compute.service.calls()["tasks"]

    def die(request_ids: list[str]) -> None:
        raise Killed

    with pytest.raises(Killed):
        submit_queue.submit_waiting(messages, backend=backend, after_send=die)
    claimed = [record(r.request_id) for r in requests]
    assert all(r.batch_id and not r.task_id for r in claimed)

    # Delivered again at once: another submitter may still be sending, so they come back later.
    later = submit_queue.submit_waiting(messages, backend=backend)
    assert sorted(later.retry) == sorted(messages) and later.calls == 0
    # Once the claim is stale, Globus Compute is asked: the batch arrived, so nothing is resent.
    monkeypatch.setattr(get_settings(), "submit_claim_seconds", 0.0)
    done = submit_queue.submit_waiting(messages, backend=backend)
    assert sorted(done.skipped) == sorted(r.request_id for r in requests) and done.calls == 0
    assert globus_compute.service.calls()["tasks"] == tasks_before + 3

    # The reconciler finds each task by the request id its result carries, and ends them. The
    # tasks may finish in different passes, and a pass sees only requests still open.
    completed: list[str] = []
    deadline = time.monotonic() + 30
    while len(completed) < 3 and time.monotonic() < deadline:
        report = reconciler.reconcile(now=time.time() + 60, grace_seconds=0, backend=backend)
        assert not report.errors
        completed += report.completed
        time.sleep(0.2)
    assert sorted(completed) == sorted(r.request_id for r in requests)
    for i, request in enumerate(requests):
        assert record(request.request_id).status == "completed"
        result = results.load(request.request_id)
        assert result is not None and result.body["echo"] == f"k{i}"


def test_a_submitter_killed_before_sending_is_taken_over(
    queue: str,
    function_id: str,
    backend: GlobusComputeBackend,
    globus_compute: ComputeStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = queued_request(function_id)
    # A submitter claimed it for a batch that never reached Globus Compute, then died.
    assert records.claim(request.request_id, "0dead000-0000-4000-8000-000000000000")
    monkeypatch.setattr(get_settings(), "submit_claim_seconds", 0.0)

    report = submit_queue.submit_waiting({"m": request.to_message()}, backend=backend)

    assert report.submitted == [request.request_id] and report.calls == 1
    taken = record(request.request_id)
    assert taken.task_id and taken.batch_id != "0dead000-0000-4000-8000-000000000000"


def test_a_batch_globus_compute_refuses_ends_its_requests_with_the_reason(
    queue: str, function_id: str, backend: GlobusComputeBackend
) -> None:
    unknown = "0c0ffee0-0000-4000-8000-00000000dead"
    request = queued_request(function_id, endpoint_id=unknown)

    report = submit_queue.submit_waiting({"m": request.to_message()}, backend=backend)

    assert report.failed == [request.request_id] and report.retry == []
    assert record(request.request_id).status == "failed"
    result = results.load(request.request_id)
    assert result is not None and result.status_code == 503
    assert "refused the batch" in result.body["error"]["message"]


def test_with_no_budget_left_the_claims_are_given_back_for_later(
    queue: str,
    function_id: str,
    backend: GlobusComputeBackend,
    globus_compute: ComputeStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = queued_request(function_id)
    settings = get_settings()
    monkeypatch.setattr(settings, "compute_api_calls_per_window", 1)
    monkeypatch.setattr(settings, "compute_api_window_seconds", 3600.0)
    from first_core.compute import budget

    with budget.priority(budget.Priority.SUBMITTER):
        assert budget.try_take() == 0.0  # the hour's one unit, gone
    before = submits(globus_compute)

    report = submit_queue.submit_waiting({"m": request.to_message()}, backend=backend)

    assert report.retry == ["m"] and submits(globus_compute) == before
    assert record(request.request_id).batch_id is None  # free for the next delivery


def test_the_reconciler_leaves_queued_requests_to_the_submitter(
    queue: str, function_id: str
) -> None:
    request = queued_request(function_id)

    class NoBackend:
        def task_states(self, task_ids: list[str]) -> dict[str, TaskState]:
            assert task_ids == []
            return {}

    report = reconciler.reconcile(now=time.time() + 3600, grace_seconds=0, backend=NoBackend())  # type: ignore[arg-type]

    assert report.pending == [request.request_id]
    assert record(request.request_id).status == "submitted"


# ---- the proxy's side: at once, or the queue ----------------------------------------------------


@pytest.fixture
def proxy_path(
    queue: str, registry_table: None, fake_backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> FakeBackend:
    """The proxy's path, on a budget of 3 units, with a backend that records what it submits."""
    settings = get_settings()
    monkeypatch.setattr(settings, "compute_api_calls_per_window", 3)
    monkeypatch.setattr(settings, "compute_api_window_seconds", 3600.0)
    monkeypatch.setattr(settings, "compute_api_queue_reserve", 1)
    return fake_backend


def test_requests_submit_at_once_while_units_last_then_queue(
    proxy_path: FakeBackend, queue: str
) -> None:
    body = json.dumps(
        {"model": ENDPOINT.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    ).encode()
    submissions = [inference.submit(ALICE, "chat/completions", body) for _ in range(3)]

    # Two units of the window may go to requests at once (each takes one, not two); the third
    # is the submitter's, so the third request waits in the queue.
    assert [s.task_id for s in submissions] == ["task-1", "task-2", None]
    assert [kwargs["request_id"] for _, _, kwargs in proxy_path.submits] == [
        s.request_id for s in submissions[:2]
    ]
    queued = record(submissions[2].request_id)
    assert queued.queued_at is not None and queued.status == "submitted"
    [body_on_queue] = received(queue).values()
    message = submit_queue.QueuedRequest.from_message(body_on_queue)
    assert message.request_id == submissions[2].request_id
    assert message.endpoint_id == submissions[2].endpoint.endpoint_id
    assert message.payload is not None and message.payload["max_tokens"] == 5


def test_the_submitter_function_reports_the_messages_to_deliver_again(
    queue: str, function_id: str, backend: GlobusComputeBackend
) -> None:
    """functions.submitter, as the SQS event source invokes it: what it could not deal with yet
    comes back as batch item failures (ReportBatchItemFailures)."""
    from functions import submitter

    sent, held = queued_request(function_id, "sent"), queued_request(function_id, "held")
    assert records.claim(held.request_id, "0be15e00-0000-4000-8000-000000000000")  # fresh
    event = {
        "Records": [
            {"messageId": "m-sent", "body": sent.to_message(), "eventSource": "aws:sqs"},
            {"messageId": "m-held", "body": held.to_message(), "eventSource": "aws:sqs"},
        ]
    }
    first_core.compute.set_backend(backend)
    try:
        answer = submitter.handler(event, None)
    finally:
        first_core.compute.set_backend(None)

    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-held"}]}
    assert record(sent.request_id).task_id and not record(held.request_id).task_id
