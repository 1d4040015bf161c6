"""Creating batches (first_core.batches.lifecycle) against a fake compute backend, on in-process
moto: OpenAI batches, the per-user slots, cancelling, and FIRST's own batches."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import pytest

from first_core.batches import driver as batch_driver
from first_core.batches import lifecycle
from first_core.batches import views as batch_views
from first_core.callbacks import callback_token
from first_core.compute import TaskState
from first_core.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)
from first_core.settings import get_settings
from first_core.tables import BatchRecord, FileRecord
from tests.support.batches import (
    BATCH_ENDPOINT,
    BATCH_FUNCTION,
    MAX_TOKENS,
    batch_file,
    chat_line,
    create,
    done_report,
    is_signed,
    jsonl,
    load,
    send,
    slots,
    upload,
    url_key,
)
from tests.support.compute import FakeBackend
from tests.support.identities import BOB, CALLER
from tests.support.registry import (
    MODEL,
)

pytestmark = pytest.mark.usefixtures("aws")


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
        "max_tokens",
        "token_budget",
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
    # Lines without max_tokens are sent the endpoint's cap; all take tokens from alice's budget.
    assert kwargs["max_tokens"] == MAX_TOKENS and kwargs["token_budget"] is True

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


# ---- Idempotency-Key ------------------------------------------------------------------------


def test_a_repeat_with_the_same_key_is_the_same_batch(backend: FakeBackend) -> None:
    body = json.dumps(
        {"input_file_id": upload().file_id, "endpoint": "/v1/chat/completions",
         "completion_window": "24h"}
    ).encode()

    def create_once() -> str:
        create = partial(lifecycle.create_openai, CALLER, body)
        return lifecycle.created_once(CALLER, body, "batch-key", create).batch_id

    first, again = create_once(), create_once()

    assert first == again and len(backend.submits) == 1 and slots() == 1


def test_a_key_whose_batch_was_refused_before_it_existed_is_free_again(
    backend: FakeBackend,
) -> None:
    missing = json.dumps(
        {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions",
         "completion_window": "24h"}
    ).encode()
    with pytest.raises(NotFoundError):
        lifecycle.created_once(
            CALLER, missing, "batch-key", partial(lifecycle.create_openai, CALLER, missing)
        )
    # The key is not bound to a batch that never was: the same key with a good body works.
    body = json.dumps(
        {"input_file_id": upload().file_id, "endpoint": "/v1/chat/completions",
         "completion_window": "24h"}
    ).encode()
    record = lifecycle.created_once(
        CALLER, body, "batch-key", partial(lifecycle.create_openai, CALLER, body)
    )
    assert record.status == "in_progress"
