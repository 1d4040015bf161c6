"""The batch driver (first_core.batches.driver): lost callbacks, resubmits, expiry, and only the
open batches looked at."""

from __future__ import annotations

from typing import Any

import pytest

from first_core.batches import driver as batch_driver
from first_core.batches import lifecycle
from first_core.batches import views as batch_views
from first_core.callbacks import callback_token
from first_core.compute import TaskState
from first_core.settings import get_settings
from first_core.tables import BatchRecord
from tests.support.batches import (
    BATCH_ENDPOINT,
    BATCH_FUNCTION,
    call_back,
    create,
    done_report,
    load,
    send,
    slots,
    upload,
    url_key,
    usage_rows,
)
from tests.support.compute import FakeBackend

pytestmark = pytest.mark.usefixtures("aws")


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
    backend.states["task-2"] = TaskState("failed", error="MemoryError: OOM on node x")
    report = batch_driver.drive(backend=backend)
    assert report.ended == [batch_id] and report.resubmitted == []
    assert len(backend.submits) == 2
    record = load(batch_id)
    assert record.status == "failed" and record.open_status is None
    assert record.errors[0]["code"] == "task_failed"
    assert "2 times" in record.errors[0]["message"]
    assert "OOM on node x" in record.errors[0]["message"]
    assert "MemoryError" not in record.errors[0]["message"]  # the class is for the log
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


def test_drive_fails_a_batch_whose_report_is_out_of_range(backend: FakeBackend) -> None:
    batch_id = create(upload().file_id)  # 3 lines
    report = done_report(batch_id, completed=300, total=300)
    backend.states["task-1"] = TaskState("success", result=report)
    outcome = batch_driver.drive(backend=backend)
    assert outcome.finalized == [] and outcome.ended == [batch_id] and outcome.errors == []
    record = load(batch_id)
    assert record.status == "failed" and int(record.completed) == 0
    assert record.errors[0]["code"] == "invalid_report"
    assert "the batch has 3 lines" in record.errors[0]["message"]
