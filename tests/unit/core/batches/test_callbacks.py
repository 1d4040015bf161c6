"""The cluster's batch callbacks (first_core.batches.callbacks): progress, presigned uploads and
the done report, each verified and applied once."""

from __future__ import annotations

import json

import pytest

from first_core import storage
from first_core.batches import callbacks as batch_callbacks
from first_core.batches import files, lifecycle
from first_core.batches import views as batch_views
from first_core.callbacks import callback_token
from first_core.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
)
from first_core.tables import BatchRecord
from tests.support.batches import (
    batch_file,
    call_back,
    create,
    done_report,
    event,
    is_signed,
    load,
    send,
    slots,
    upload,
    url_key,
    usage_rows,
)
from tests.support.compute import FakeBackend
from tests.support.identities import CALLER
from tests.support.registry import (
    MODEL,
)

pytestmark = pytest.mark.usefixtures("aws")


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


# ---- bounds: counts within the batch's lines, tokens non-negative -------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"completed": 3, "failed": 1, "total": 3},  # 4 lines of 3
        {"completed": 1, "total": 4},
        {"resumed_lines": 4, "total": 3},
        {"completed": -1, "total": 3},
        {"failed": 10**40, "total": 3},
        {"completed": "2", "total": 3},
        {"completed": 1.5, "total": 3},
        {"completed": True, "total": 3},
        {"attempt": 10**30},
    ],
    ids=[
        "more-lines-than-the-batch",
        "total-over-the-file",
        "resumed-over-the-file",
        "negative",
        "giant",
        "string",
        "fraction",
        "boolean",
        "giant-attempt",
    ],
)
def test_progress_out_of_range_is_400_and_changes_nothing(
    backend: FakeBackend, fields: dict[str, object]
) -> None:
    batch_id = create(upload(batch_file(3)).file_id)
    before = load(batch_id).attribute_values
    body = {**event(batch_id, "progress"), **fields}
    with pytest.raises(InvalidRequestError) as invalid:
        send(batch_id, body)
    assert invalid.value.status == 400
    assert load(batch_id).attribute_values == before
    # The real progress still lands.
    assert call_back(batch_id, "progress", completed=3, total=3) == {"continue": True}


@pytest.mark.parametrize(
    "fields",
    [
        {"usage": {"prompt_tokens": -30, "completion_tokens": 1, "total_tokens": -29}},
        {"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 10**40}},
        {"usage": {"prompt_tokens": 100_000, "completion_tokens": 1}},  # > the file's bytes
        {"output": {"lines": 4, "bytes": 10}},
        {"errors": {"lines": 2, "bytes": 10}, "output": {"lines": 2, "bytes": 10}},
    ],
    ids=["negative-tokens", "giant-tokens", "prompt-over-the-file", "output-lines", "both-files"],
)
def test_a_done_report_out_of_range_is_400_and_the_batch_goes_on(
    backend: FakeBackend, fields: dict[str, object]
) -> None:
    batch_id = create(upload(batch_file(3)).file_id)
    report = done_report(batch_id, completed=2, failed=0, total=3, **fields)
    with pytest.raises(InvalidRequestError):
        send(batch_id, report)
    record = load(batch_id)
    assert record.status == "in_progress" and int(record.total_tokens) == 0
    assert usage_rows(batch_id) == [] and slots() == 1


def test_a_first_batch_is_held_to_its_own_total(backend: FakeBackend) -> None:
    batch_id = create(upload(batch_file(3)).file_id)
    BatchRecord(batch_id).update(actions=[BatchRecord.kind.set("first")])
    with pytest.raises(InvalidRequestError):
        call_back(batch_id, "progress", completed=5, failed=1, total=5)
    # Its file is on the cluster: the cluster's count of lines is the bound.
    assert call_back(batch_id, "progress", completed=5, failed=1, total=6) == {"continue": True}
