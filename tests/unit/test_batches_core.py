"""Batches (first_core.batches) against a fake compute backend, on in-process moto: creating,
the per-user slots, the cluster's callbacks, the batch driver, and FIRST's own batches."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import pytest

import first_core.batches.lifecycle
from first_core import storage
from first_core.batches import callbacks as batch_callbacks
from first_core.batches import driver as batch_driver
from first_core.batches import files, lifecycle
from first_core.batches import views as batch_views
from first_core.callbacks import callback_token
from first_core.compute import TaskState
from first_core.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)
from first_core.registry import (
    ClusterConfig,
    EndpointConfig,
    FunctionIds,
    Limits,
    RegistryFile,
    publish,
)
from first_core.settings import get_settings
from first_core.tables import BatchRecord, FileRecord, UsageRecord
from tests.support.batches import batch_file, chat_line, jsonl
from tests.support.compute import FakeBackend
from tests.support.identities import BOB, CALLER
from tests.support.registry import (
    EMBEDDER,
    MODEL,
    REGISTERED_FUNCTIONS,
    SOPHIA_BATCH_ENDPOINT,
    SOPHIA_ENDPOINT,
)

INFERENCE = REGISTERED_FUNCTIONS["inference"]

pytestmark = pytest.mark.usefixtures("aws")

BATCH_FUNCTION = REGISTERED_FUNCTIONS["batch"]
BATCH_ENDPOINT = SOPHIA_BATCH_ENDPOINT


MAX_TOKENS = 4096


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    fake = FakeBackend()
    monkeypatch.setattr(first_core.batches.lifecycle, "get_backend", lambda: fake)
    publish(
        RegistryFile(
            clusters={
                "sophia": ClusterConfig(
                    frameworks=["vllm"],
                    endpoints=[
                        EndpointConfig(
                            framework="vllm",
                            models=[MODEL],
                            endpoint_id=SOPHIA_ENDPOINT,
                            functions=FunctionIds(inference=INFERENCE, batch=BATCH_FUNCTION),
                            limits=Limits(max_tokens=MAX_TOKENS),
                            batches=True,
                            batch_endpoint_id=BATCH_ENDPOINT,
                        ),
                        EndpointConfig(
                            framework="vllm",
                            models=[EMBEDDER],
                            endpoint_id="0c0ffee0-0000-4000-8000-0000000000e2",
                            functions=FunctionIds(inference=INFERENCE),
                        ),
                    ],
                )
            }
        )
    )
    return fake


# ---- helpers ------------------------------------------------------------------------------------


def upload(content: bytes | None = None, caller: Any = CALLER) -> FileRecord:
    view = files.create(caller, files.Upload("in.jsonl", "batch", content or batch_file(3)))
    return FileRecord.get(view["id"], consistent_read=True)


def create(file_id: str, endpoint: str = "/v1/chat/completions", caller: Any = CALLER) -> str:
    body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
    return lifecycle.create_openai(caller, json.dumps(body).encode()).batch_id


def load(batch_id: str) -> BatchRecord:
    return BatchRecord.get(batch_id, consistent_read=True)


def slots() -> int:
    return lifecycle.slots_in_use(CALLER.user_id)


def usage_rows(batch_id: str) -> list[UsageRecord]:
    return [row for row in UsageRecord.scan() if row.request_id == batch_id]


def event(batch_id: str, kind: str, attempt: int = 1, **fields: Any) -> dict[str, Any]:
    return {"batch_id": batch_id, "event": kind, "attempt": attempt, **fields}


def call_back(batch_id: str, kind: str, attempt: int = 1, **fields: Any) -> dict[str, Any]:
    body = json.dumps(event(batch_id, kind, attempt, **fields)).encode()
    return batch_callbacks.accept_callback(batch_id, f"Bearer {callback_token(batch_id)}", body)


def send(batch_id: str, body: dict[str, Any]) -> dict[str, Any]:
    raw = json.dumps(body).encode()
    return batch_callbacks.accept_callback(batch_id, f"Bearer {callback_token(batch_id)}", raw)


def done_report(
    batch_id: str, attempt: int = 1, outcome: str = "completed", **fields: Any
) -> dict[str, Any]:
    fields.setdefault("completed", 0)
    return event(batch_id, "done", attempt, outcome=outcome, **fields)


def url_key(url: str) -> str:
    """The object key a presigned URL names (path-style or virtual-host style)."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path).lstrip("/")
    bucket = get_settings().results_bucket
    return path[len(bucket) + 1 :] if path.startswith(bucket + "/") else path


def is_signed(url: str) -> bool:
    """Signed with SigV4 (S3 refuses SigV2 for buckets made since 2020)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    return query.get("X-Amz-Algorithm") == ["AWS4-HMAC-SHA256"] and "X-Amz-Signature" in query


# ---- creating an OpenAI batch -------------------------------------------------------------------


def test_create_openai_submits_once_and_records_the_task(backend: FakeBackend) -> None:
    input_file = upload(batch_file(3))
    batch_id = create(input_file.file_id)
    assert len(backend.submits) == 1
    endpoint_id, function_id, kwargs = backend.submits[0]
    assert (endpoint_id, function_id) == (BATCH_ENDPOINT, BATCH_FUNCTION)
    assert set(kwargs) == {
        "batch_id",
        "model",
        "input",
        "output",
        "callback_url",
        "callback_token",
        "chunk_lines",
        "attempt",
        "owner",
    }
    assert kwargs["batch_id"] == batch_id and kwargs["model"] == MODEL
    assert kwargs["owner"] == CALLER.username  # the cluster's `{user}` directories
    assert set(kwargs["input"]) == {"url"}
    assert url_key(kwargs["input"]["url"]) == f"files/{input_file.file_id}.jsonl"
    assert is_signed(kwargs["input"]["url"])
    assert kwargs["output"] == {"upload": True}
    assert kwargs["callback_url"].endswith(f"/callbacks/{batch_id}/batch")
    assert kwargs["callback_url"].startswith(get_settings().public_base_url.rstrip("/"))
    assert kwargs["callback_token"] == callback_token(batch_id)
    assert kwargs["attempt"] == 1
    assert kwargs["chunk_lines"] == get_settings().batch_chunk_lines

    record = load(batch_id)
    assert (record.status, record.task_id, record.open_status) == ("in_progress", "task-1", "open")
    assert (record.kind, record.model, record.cluster, record.endpoint_id) == (
        "openai",
        MODEL,
        "sophia",
        BATCH_ENDPOINT,
    )
    assert (int(record.total), int(record.attempt)) == (3, 1)
    assert record.input_file_id == input_file.file_id and record.in_progress_at is not None
    assert slots() == 1
    view = batch_views.view(record)
    assert view["status"] == "in_progress" and view["request_counts"]["total"] == 3
    assert view["usage"] is None


@pytest.mark.parametrize(
    ("content", "endpoint", "codes"),
    [
        pytest.param(batch_file(2), "/v1/embeddings", ["mismatched_endpoint"], id="endpoint"),
        pytest.param(
            jsonl(
                chat_line("a"), {**chat_line("b"), "body": {**chat_line()["body"], "model": "x"}}
            ),
            "/v1/chat/completions",
            ["mismatched_model"],
            id="two-models",
        ),
    ],
)
def test_a_file_that_does_not_fit_makes_a_failed_batch_without_a_submit(
    backend: FakeBackend, content: bytes, endpoint: str, codes: list[str]
) -> None:
    input_file = upload(content)
    body = {"input_file_id": input_file.file_id, "endpoint": endpoint, "completion_window": "24h"}
    view = batch_views.view(lifecycle.create_openai(CALLER, json.dumps(body).encode()))
    assert view["status"] == "failed"
    assert [e["code"] for e in view["errors"]["data"]] == codes
    record = load(view["id"])
    assert record.status == "failed" and record.open_status is None and record.failed_at
    assert backend.submits == []
    assert slots() == 0


def test_another_users_file_is_not_found(backend: FakeBackend) -> None:
    input_file = upload(caller=BOB)
    with pytest.raises(NotFoundError) as raised:
        create(input_file.file_id)
    assert raised.value.message == f"No such File object: {input_file.file_id}"
    assert backend.submits == [] and list(BatchRecord.scan()) == [] and slots() == 0


def test_a_bad_create_body_is_refused(backend: FakeBackend) -> None:
    input_file = upload()
    for body, param in (
        ({"input_file_id": input_file.file_id, "endpoint": "/v1/chat/completions"}, None),
        (
            {"input_file_id": input_file.file_id, "endpoint": "/v1/x", "completion_window": "24h"},
            "endpoint",
        ),
    ):
        with pytest.raises(InvalidRequestError) as raised:
            batch_views.view(lifecycle.create_openai(CALLER, json.dumps(body).encode()))
        if param:
            assert raised.value.param == param
    assert backend.submits == [] and list(BatchRecord.scan()) == []


def test_at_most_two_batches_at_once(backend: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "max_concurrent_batches_per_user", 2)
    input_file = upload()
    first, second = create(input_file.file_id), create(input_file.file_id)
    assert slots() == 2
    with pytest.raises(RateLimitError) as raised:
        create(input_file.file_id)
    assert raised.value.status == 429 and raised.value.headers.get("Retry-After")
    assert len(backend.submits) == 2 and len(list(BatchRecord.scan())) == 2
    # Another user has their own slots.
    create(upload(caller=BOB).file_id, caller=BOB)
    assert slots() == 2
    # Ending the batches gives the slots back.
    assert send(first, done_report(first)) == {"accepted": True}
    lifecycle.cancel(load(second))
    assert send(second, done_report(second, outcome="cancelled")) == {"accepted": True}
    assert slots() == 0
    assert load(create(input_file.file_id)).status == "in_progress"


def test_a_refused_submit_fails_the_batch_and_gives_the_slot_back(backend: FakeBackend) -> None:
    input_file = upload()
    backend.fail_with = ServiceUnavailableError("Globus Compute is down.")
    with pytest.raises(ServiceUnavailableError):
        create(input_file.file_id)
    (record,) = list(BatchRecord.scan())
    assert record.status == "failed" and record.open_status is None
    assert record.errors and record.errors[0]["code"] == "submit_failed"
    assert "Globus Compute is down." in record.errors[0]["message"]
    assert slots() == 0


# ---- callbacks ----------------------------------------------------------------------------------


def test_a_wrong_token_is_refused(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    body = json.dumps(event(batch_id, "progress", completed=1)).encode()
    for authorization in (None, "Bearer nope", f"Bearer {callback_token('batch_other')}"):
        with pytest.raises(AuthenticationError):
            batch_callbacks.accept_callback(batch_id, authorization, body)
    assert int(load(batch_id).completed) == 0


def test_a_callback_for_another_batch_is_refused(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    body = json.dumps(event("batch_other", "progress")).encode()
    with pytest.raises(InvalidRequestError):
        batch_callbacks.accept_callback(batch_id, f"Bearer {callback_token(batch_id)}", body)


def test_progress_updates_the_counts(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    answer = call_back(batch_id, "progress", completed=2, failed=1, total=3, resumed_lines=1)
    assert answer == {"continue": True}
    record = load(batch_id)
    assert (int(record.completed), int(record.failed), int(record.total)) == (2, 1, 3)
    assert int(record.resumed_lines) == 1


def test_progress_after_cancel_says_stop(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    view = batch_views.view(lifecycle.cancel(load(batch_id)))
    assert view["status"] == "cancelling" and view["cancelling_at"]
    assert load(batch_id).status == "cancelling"
    assert call_back(batch_id, "progress", completed=1, total=3) == {"continue": False}
    assert load(batch_id).status == "cancelling"


def test_progress_from_a_replaced_attempt_is_ignored(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    load(batch_id).update(actions=[BatchRecord.attempt.set(2)])
    assert call_back(batch_id, "progress", attempt=1, completed=3, total=3) == {"continue": False}
    assert int(load(batch_id).completed) == 0
    assert call_back(batch_id, "progress", attempt=2, completed=2, total=3) == {"continue": True}
    assert int(load(batch_id).completed) == 2


def test_upload_answers_presigned_puts_for_the_outputs(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    answer = call_back(batch_id, "upload")
    assert answer["continue"] is True
    assert url_key(answer["output_url"]) == f"batches/{batch_id}/output.jsonl"
    assert url_key(answer["error_url"]) == f"batches/{batch_id}/errors.jsonl"
    assert is_signed(answer["output_url"]) and is_signed(answer["error_url"])


def test_done_completes_once(backend: FakeBackend) -> None:
    batch_id = create(upload(batch_file(3)).file_id)
    output, errors = b'{"id": "a"}\n{"id": "b"}\n', b'{"id": "c"}\n'
    storage.put(f"batches/{batch_id}/output.jsonl", output)
    storage.put(f"batches/{batch_id}/errors.jsonl", errors)
    report = done_report(
        batch_id,
        completed=2,
        failed=1,
        total=3,
        usage={"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42},
        output={"lines": 2, "bytes": len(output)},
        errors={"lines": 1, "bytes": len(errors)},
    )
    assert send(batch_id, report) == {"accepted": True}
    record = load(batch_id)
    assert record.status == "completed" and record.open_status is None
    assert record.completed_at and record.finalizing_at
    assert (int(record.completed), int(record.failed), int(record.total)) == (2, 1, 3)
    assert (int(record.prompt_tokens), int(record.completion_tokens)) == (30, 12)
    assert int(record.total_tokens) == 42
    for file_id, key, content, lines in (
        (record.output_file_id, f"batches/{batch_id}/output.jsonl", output, 2),
        (record.error_file_id, f"batches/{batch_id}/errors.jsonl", errors, 1),
    ):
        assert file_id
        out = files.get_owned(file_id, CALLER)
        assert (out.user_id, out.purpose, out.s3_key) == (CALLER.user_id, "batch_output", key)
        assert (int(out.bytes), int(out.line_count)) == (len(content), lines)
        assert files.content(out).body == content
    (row,) = usage_rows(batch_id)
    assert (row.user_id, row.model, row.cluster, row.status) == (
        CALLER.user_id,
        MODEL,
        "sophia",
        "completed",
    )
    assert (int(row.prompt_tokens), int(row.completion_tokens), int(row.total_tokens)) == (
        30,
        12,
        42,
    )
    assert row.openai_path == "batches/v1/chat/completions"
    assert slots() == 0
    view = batch_views.view(record)
    assert view["usage"]["total_tokens"] == 42 and view["output_file_id"] == record.output_file_id

    # The same report again (a retried callback, or the driver's lost-callback path).
    assert send(batch_id, report) == {"accepted": False}
    assert len(usage_rows(batch_id)) == 1
    assert slots() == 0
    assert load(batch_id).attribute_values == record.attribute_values
    # And late progress stops the cluster.
    assert call_back(batch_id, "progress", completed=3) == {"continue": False}
    assert call_back(batch_id, "upload") == {"continue": False}


def test_done_without_outputs_completes_without_files(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    assert send(batch_id, done_report(batch_id)) == {"accepted": True}
    record = load(batch_id)
    assert record.status == "completed"
    assert record.output_file_id is None and record.error_file_id is None


def test_done_after_cancel_is_cancelled(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    lifecycle.cancel(load(batch_id))
    storage.put(f"batches/{batch_id}/output.jsonl", b'{"id": "a"}\n')
    report = done_report(batch_id, outcome="cancelled", completed=1, output={"lines": 1})
    assert send(batch_id, report) == {"accepted": True}
    record = load(batch_id)
    assert record.status == "cancelled" and record.cancelled_at and record.open_status is None
    assert record.output_file_id and int(record.completed) == 1
    assert slots() == 0 and len(usage_rows(batch_id)) == 1
    assert (
        batch_views.view(lifecycle.cancel(record))["status"] == "cancelled"
    )  # cancelling again changes nothing


def test_done_with_a_missing_output_fails(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    report = done_report(batch_id, completed=3, total=3, output={"lines": 3})
    assert send(batch_id, report) == {"accepted": True}
    record = load(batch_id)
    assert record.status == "failed" and record.output_file_id is None
    assert [e["code"] for e in record.errors] == ["output_missing"]
    assert f"batches/{batch_id}/output.jsonl" in record.errors[0]["message"]
    assert slots() == 0


def test_an_ended_batch_cannot_be_cancelled(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    send(batch_id, done_report(batch_id))
    with pytest.raises(ConflictError):
        lifecycle.cancel(load(batch_id))


# ---- the batch driver ---------------------------------------------------------------------------


def test_drive_finalizes_a_task_whose_callback_was_lost(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    backend.states["task-1"] = TaskState(
        "success", result=done_report(batch_id, completed=3, total=3, usage=usage)
    )
    report = batch_driver.drive(backend=backend)
    assert report.checked == 1 and report.finalized == [batch_id] and report.errors == []
    record = load(batch_id)
    assert (record.status, int(record.completed), int(record.total_tokens)) == ("completed", 3, 9)
    assert len(usage_rows(batch_id)) == 1 and slots() == 0
    # An ended batch leaves the open index: the driver does not look at it again.
    backend.asked.clear()
    assert batch_driver.drive(backend=backend).checked == 0
    assert backend.asked == []


def test_drive_fails_a_task_that_ended_without_a_done_report(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    backend.states["task-1"] = TaskState("success", result={"something": "else"})
    report = batch_driver.drive(backend=backend)
    assert report.finalized == [] and report.ended == [batch_id] and report.errors == []
    record = load(batch_id)
    assert record.status == "failed" and record.errors[0]["code"] == "no_report"
    assert slots() == 0


def test_drive_resubmits_a_failed_task_with_the_next_attempt(backend: FakeBackend) -> None:
    input_file = upload()
    batch_id = create(input_file.file_id)
    backend.states["task-1"] = TaskState("failed", error="WorkerLost")
    report = batch_driver.drive(backend=backend)
    assert report.resubmitted == [batch_id]
    assert len(backend.submits) == 2
    endpoint_id, function_id, kwargs = backend.submits[1]
    assert (endpoint_id, function_id) == (BATCH_ENDPOINT, BATCH_FUNCTION)
    assert kwargs["attempt"] == 2 and kwargs["batch_id"] == batch_id
    assert url_key(kwargs["input"]["url"]) == f"files/{input_file.file_id}.jsonl"
    assert kwargs["output"] == {"upload": True}
    assert kwargs["callback_token"] == callback_token(batch_id)
    record = load(batch_id)
    assert (int(record.attempt), record.task_id, record.status) == (2, "task-2", "in_progress")
    assert batch_views.view(record)["attempts"] == 2
    assert slots() == 1
    # The replaced attempt's callbacks are now ignored.
    assert call_back(batch_id, "progress", attempt=1, completed=1) == {"continue": False}


def test_drive_fails_a_batch_at_its_last_attempt(
    backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "batch_max_attempts", 2)
    batch_id = create(upload().file_id)
    backend.states["task-1"] = TaskState("failed", error="WorkerLost")
    batch_driver.drive(backend=backend)
    backend.states["task-2"] = TaskState("failed", error="OOM on node x")
    report = batch_driver.drive(backend=backend)
    assert report.ended == [batch_id] and report.resubmitted == []
    assert len(backend.submits) == 2
    record = load(batch_id)
    assert record.status == "failed" and record.open_status is None
    assert record.errors[0]["code"] == "task_failed"
    assert "2 times" in record.errors[0]["message"]
    assert "OOM on node x" in record.errors[0]["message"]
    assert slots() == 0 and len(usage_rows(batch_id)) == 1


def test_drive_ends_a_cancelling_batch_whose_task_died(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    lifecycle.cancel(load(batch_id))
    backend.states["task-1"] = TaskState("failed", error="killed")
    report = batch_driver.drive(backend=backend)
    assert report.ended == [batch_id] and len(backend.submits) == 1
    record = load(batch_id)
    assert record.status == "cancelled" and record.cancelled_at
    assert slots() == 0


def test_drive_expires_a_task_pending_past_the_window(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    backend.states["task-1"] = TaskState("pending")
    expires = float(load(batch_id).expires_at)
    grace = get_settings().reconcile_grace_seconds
    assert batch_driver.drive(now=expires + grace - 1, backend=backend).ended == []
    assert load(batch_id).status == "in_progress"
    report = batch_driver.drive(now=expires + grace + 1, backend=backend)
    assert report.ended == [batch_id]
    record = load(batch_id)
    assert record.status == "expired" and record.expired_at and record.open_status is None
    assert slots() == 0


def test_drive_expires_a_task_that_died_past_the_window(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    backend.states["task-1"] = TaskState("failed", error="gone")
    expires = float(load(batch_id).expires_at)
    assert batch_driver.drive(now=expires + 1, backend=backend).ended == [batch_id]
    assert load(batch_id).status == "expired" and len(backend.submits) == 1


def test_drive_fails_a_batch_with_no_task_after_the_grace(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)
    load(batch_id).update(actions=[BatchRecord.task_id.remove()])
    created = float(load(batch_id).created_at)
    grace = get_settings().reconcile_grace_seconds
    assert batch_driver.drive(now=created + grace - 1, backend=backend).ended == []
    assert load(batch_id).status == "in_progress"
    report = batch_driver.drive(now=created + grace + 1, backend=backend)
    assert report.ended == [batch_id] and backend.asked == []
    record = load(batch_id)
    assert record.status == "failed" and record.errors[0]["code"] == "not_submitted"
    assert slots() == 0


def test_drive_looks_only_at_open_batches(backend: FakeBackend) -> None:
    ended = create(upload().file_id)
    send(ended, done_report(ended))
    running = create(upload().file_id)
    backend.states["task-2"] = TaskState("pending")
    report = batch_driver.drive(backend=backend)
    assert report.checked == 1 and backend.asked == ["task-2"]
    assert load(ended).status == "completed" and load(running).status == "in_progress"


def test_drive_keeps_going_after_one_bad_batch(
    backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = create(upload().file_id)
    second = create(upload().file_id)
    backend.states["task-1"] = TaskState("success", result=done_report(first))
    backend.states["task-2"] = TaskState("success", result=done_report(second))
    real_finalize = batch_driver.finalize

    def finalize(record: BatchRecord, event: Any) -> bool:
        if record.batch_id == first:
            raise RuntimeError("S3 is flaky")
        return real_finalize(record, event)

    monkeypatch.setattr(batch_driver, "finalize", finalize)
    report = batch_driver.drive(backend=backend)
    assert report.checked == 2 and report.finalized == [second]
    assert len(report.errors) == 1 and report.errors[0].startswith(first)
    assert load(first).status == "in_progress"


def test_drive_looks_up_every_task_in_one_call_and_reports_a_failed_lookup(
    backend: FakeBackend,
) -> None:
    batches = [create(upload().file_id) for _ in range(2)]
    calls: list[list[str]] = []

    def task_states(task_ids: list[str]) -> dict[str, TaskState]:
        calls.append(task_ids)
        raise RuntimeError("Globus is flaky")

    backend.task_states = task_states  # type: ignore[method-assign]
    report = batch_driver.drive(backend=backend)
    assert calls == [["task-1", "task-2"]]
    assert report.checked == 0 and report.errors == ["task states: RuntimeError: Globus is flaky"]
    assert {load(b).status for b in batches} == {"in_progress"}


def test_drive_resubmits_through_the_backend_it_was_given(
    backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_id = create(upload().file_id)
    given = FakeBackend()
    given.states["task-1"] = TaskState("failed", error="WorkerLost")
    report = batch_driver.drive(backend=given)
    assert report.resubmitted == [batch_id]
    assert [kwargs["attempt"] for _, _, kwargs in given.submits] == [2]


# ---- FIRST's batches ----------------------------------------------------------------------------


def create_first(**body: Any) -> dict[str, Any]:
    record = lifecycle.create_first(
        CALLER, "sophia", "vllm", json.dumps({"model": MODEL, **body}).encode()
    )
    return batch_views.first_summary(record)


@pytest.mark.parametrize(
    ("body", "path", "folder"),
    [
        ({"input_file": "jobs/in.jsonl"}, "jobs/in.jsonl", "jobs"),
        ({"input_file": "in.jsonl"}, "in.jsonl", "."),
        ({"input_file": "/eagle/proj/in.jsonl"}, "/eagle/proj/in.jsonl", "/eagle/proj"),
        (
            {"input_file": "/eagle/proj/in.jsonl", "output_folder_path": "/eagle/out"},
            "/eagle/proj/in.jsonl",
            "/eagle/out",
        ),
    ],
)
def test_create_first_submits_cluster_paths(
    backend: FakeBackend, body: dict[str, Any], path: str, folder: str
) -> None:
    summary = create_first(**body)
    batch_id = summary["batch_id"]
    assert summary["id"] == batch_id and summary["status"] == "running"
    assert (summary["cluster"], summary["framework"], summary["model"]) == ("sophia", "vllm", MODEL)
    assert (summary["input_file"], summary["output_folder_path"]) == (path, folder)
    (submit,) = backend.submits
    kwargs = submit[2]
    assert kwargs["input"] == {"path": path} and kwargs["output"] == {"folder": folder}
    assert kwargs["attempt"] == 1 and kwargs["callback_token"] == callback_token(batch_id)
    record = load(batch_id)
    assert (record.kind, record.input_path, record.output_folder_path) == ("first", path, folder)
    assert record.status == "in_progress" and slots() == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input_file": "../etc/passwd"}, "input_file"),
        ({"input_file": "/eagle/a/../../etc/x.jsonl"}, "input_file"),
        ({"input_file": "in\x00.jsonl"}, "input_file"),
        ({"input_file": "in.jsonl", "output_folder_path": "out/.."}, "output_folder_path"),
        ({"input_file": "in.jsonl", "output_folder_path": "/x\x00y"}, "output_folder_path"),
    ],
)
def test_create_first_refuses_escaping_paths(
    backend: FakeBackend, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        create_first(**body)
    assert raised.value.param == param
    assert backend.submits == [] and list(BatchRecord.scan()) == [] and slots() == 0


def test_first_status_summary_and_result(backend: FakeBackend) -> None:
    batch_id = create_first(input_file="/eagle/in.jsonl")["batch_id"]
    record = load(batch_id)
    assert batch_views.first_status(record) == "running"
    with pytest.raises(ConflictError):
        batch_views.first_result(record)
    report = done_report(
        batch_id,
        completed=4,
        failed=1,
        total=5,
        usage={"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10},
        output={"lines": 4, "path": "/eagle/in_results.jsonl"},
        errors={"lines": 1, "path": "/eagle/in_errors.jsonl"},
    )
    assert send(batch_id, report) == {"accepted": True}
    record = load(batch_id)
    assert batch_views.first_status(record) == "completed"
    summary = batch_views.first_summary(record)
    assert summary["status"] == "completed" and summary["completed_at"]
    result = batch_views.first_result(record)
    assert (result["output_file"], result["error_file"]) == (
        "/eagle/in_results.jsonl",
        "/eagle/in_errors.jsonl",
    )
    assert result["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    assert result["usage"]["total_tokens"] == 10
    assert list(FileRecord.scan(FileRecord.purpose == "batch_output")) == []
    assert [s["batch_id"] for s in batch_views.first_list(CALLER, "completed")] == [batch_id]
    assert batch_views.first_list(CALLER, "running") == []
    assert slots() == 0


def test_first_result_of_a_failed_batch(backend: FakeBackend) -> None:
    batch_id = create_first(input_file="in.jsonl")["batch_id"]
    report = done_report(
        batch_id, outcome="failed", error={"code": "bad_input", "message": "no such file"}
    )
    send(batch_id, report)
    record = load(batch_id)
    assert batch_views.first_status(record) == "failed"
    assert batch_views.first_summary(record)["failed_at"]
    with pytest.raises(InvalidRequestError) as raised:
        batch_views.first_result(record)
    assert raised.value.code == "batch_failed" and "no such file" in raised.value.message


def test_drive_ends_a_cancelled_batch_whose_task_never_started_as_cancelled(
    backend: FakeBackend,
) -> None:
    batch_id = create(upload().file_id)
    lifecycle.cancel(load(batch_id))
    backend.states["task-1"] = TaskState("pending")
    expires = float(load(batch_id).expires_at)
    grace = get_settings().reconcile_grace_seconds
    assert batch_driver.drive(now=expires + grace + 1, backend=backend).ended == [batch_id]
    assert load(batch_id).status == "cancelled"


def test_a_line_over_the_endpoints_max_tokens_fails_the_batch_naming_it(
    backend: FakeBackend,
) -> None:
    lines = [
        chat_line("a", max_tokens=16),
        chat_line("b", max_tokens=MAX_TOKENS + 1),
        chat_line("c", max_tokens=MAX_TOKENS),
    ]
    input_file = upload(jsonl(*lines))
    assert (int(input_file.max_tokens), int(input_file.max_tokens_line)) == (MAX_TOKENS + 1, 2)
    batch_id = create(input_file.file_id)
    record = load(batch_id)
    assert record.status == "failed" and backend.submits == []
    (problem,) = record.errors
    assert problem["code"] == "max_tokens_exceeded" and problem["line"] == 2
    assert problem["param"] == "body.max_tokens" and str(MAX_TOKENS) in problem["message"]
    assert slots() == 0
    # Within the limit, the same file runs.
    fits = upload(jsonl(lines[0], lines[2]))
    assert load(create(fits.file_id)).status == "in_progress"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"endpoint": "/v1/chat/completions", "completion_window": "24h"},
            "Missing required parameter: 'input_file_id'.",
        ),
        (
            {"input_file_id": "f", "endpoint": "/v1/images", "completion_window": "24h"},
            "Invalid value for 'endpoint': must be '/v1/chat/completions', '/v1/completions' "
            "or '/v1/embeddings' (got \"/v1/images\").",
        ),
        (
            {"input_file_id": "f", "endpoint": "/v1/embeddings", "completion_window": "24h"}
            | {"x": 0},
            "Unrecognized request argument supplied: x",
        ),
        ([1, 2], "The request body must be a JSON object."),
    ],
)
def test_a_bad_batch_request_is_refused_in_openais_words(body: Any, message: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        lifecycle.create_openai(CALLER, json.dumps(body).encode())
    assert raised.value.message == message
