"""The batch driver (scheduled, `app.batch_driver`; locally beside the reconciler): it looks at
every open batch's task once.

- a finished task's return value is its `done` report: the batch is finalized from it (the
  `done` callback was lost);
- a failed or vanished task (a killed worker, a lost node) is submitted again with the next
  attempt, which resumes from the checkpoints the function left on the cluster, until
  `batch_max_attempts`; a cancelled or expired batch ends instead;
- a task still pending past the completion window ends the batch `expired`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError

from first_core.batches.callbacks import event_problem, finalize
from first_core.batches.direct import run_chunk
from first_core.batches.lifecycle import DIRECT_TASK, OPEN_STATES, end, error_entry, submit
from first_core.compute import ComputeBackend, TaskState, background_lookup, get_backend
from first_core.errors import public_message
from first_core.schemas.wire import BatchEvent
from first_core.settings import get_settings
from first_core.tables import BatchRecord, update_if

log = logging.getLogger("first.batches")


@dataclass
class DriveReport:
    """What one batch-driver run did, batch ids by outcome."""

    checked: int = 0
    finalized: list[str] = field(default_factory=list)
    resubmitted: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def drive(now: float | None = None, backend: ComputeBackend | None = None) -> DriveReport:
    """Look at every open batch's task once (their states in bulk, at the API budget's
    background priority); see the module docstring."""
    now = time.time() if now is None else now
    report = DriveReport()
    open_batches = list(BatchRecord.by_open_status.query("open"))
    if not open_batches:
        return report
    # A direct backend's batches are run here, a chunk each run (first_core.batches.direct).
    direct = [r for r in open_batches if r.task_id == DIRECT_TASK]
    for record in direct:
        report.checked += 1
        try:
            if run_chunk(record, now) == "finalized":
                report.finalized.append(record.batch_id)
        except Exception as error:  # one bad batch must not stop the others
            log.exception("could not run a chunk of batch %s", record.batch_id)
            report.errors.append(f"{record.batch_id}: {type(error).__name__}: {error}")
    open_batches = [r for r in open_batches if r.task_id != DIRECT_TASK]
    if not open_batches:
        return report
    backend = backend or get_backend()
    task_ids = [r.task_id for r in open_batches if r.task_id]
    states = background_lookup(lambda: backend.task_states(task_ids), report.errors)
    if states is None:
        return report  # the next run looks again
    for record in open_batches:
        report.checked += 1
        try:
            _drive_one(record, now, states, backend, report)
        except Exception as error:  # one bad batch must not stop the others
            log.exception("could not drive batch %s", record.batch_id)
            report.errors.append(f"{record.batch_id}: {type(error).__name__}: {error}")
    return report


def _drive_one(
    record: BatchRecord,
    now: float,
    states: dict[str, TaskState],
    backend: ComputeBackend,
    report: DriveReport,
) -> None:
    batch_id = record.batch_id
    grace = get_settings().reconcile_grace_seconds
    if not record.task_id:
        # `_start` writes the task id right after the submit; one missing for long never ran.
        never_ran = now - float(record.created_at) > grace
        if never_ran and end(record, "failed", errors=[error_entry("not_submitted", "No task.")]):
            report.ended.append(batch_id)
        return
    state = states.get(record.task_id, TaskState("unknown", error="not looked up"))
    if state.status == "success":
        try:
            event: BatchEvent | None = BatchEvent.model_validate(state.result)
        except ValidationError:
            event = None
        problem = event_problem(record, event) if event is not None else None
        if problem is not None:  # checked as its callback would have been
            reason = f"The batch task's report is out of range: {problem}"
            if end(record, "failed", errors=[error_entry("invalid_report", reason)]):
                report.ended.append(batch_id)
            return
        if event is not None and event.event == "done":
            if finalize(record, event):
                report.finalized.append(batch_id)
            return
        reason = "The batch task ended without a report."
        if end(record, "failed", errors=[error_entry("no_report", reason)]):
            report.ended.append(batch_id)
        return
    if state.status == "pending":
        # Past the window, a task still pending never started or stopped calling back.
        overdue = now > float(record.expires_at) + grace
        status = "cancelled" if record.status == "cancelling" else "expired"
        if overdue and end(record, status):
            report.ended.append(batch_id)
        return
    # failed or unknown: the task died (a killed worker, a lost node, a vanished task). Its
    # reason (an exception line from the cluster) is logged whole and shown in the client's words.
    log.warning("batch %s: task %s: %s", batch_id, state.status, state.error)
    shown = public_message(state.error or "", "unknown")
    if record.status == "cancelling" or now > float(record.expires_at):
        status = "cancelled" if record.status == "cancelling" else "expired"
        if end(record, status, errors=[error_entry("task_failed", shown)]):
            report.ended.append(batch_id)
        return
    attempt = int(record.attempt)
    if attempt >= get_settings().batch_max_attempts:
        reason = f"The batch task failed {attempt} times; last: {shown}"
        if end(record, "failed", errors=[error_entry("task_failed", reason)]):
            report.ended.append(batch_id)
        return
    _resubmit(record, attempt + 1, state.error, backend)
    report.resubmitted.append(batch_id)


def _resubmit(record: BatchRecord, attempt: int, why: str | None, backend: ComputeBackend) -> None:
    """Start the next attempt; it resumes from the cluster's checkpoints. The update is
    conditioned on the task it replaces, so only one driver's task is recorded (another's
    carries the same attempt number and would write the same checkpoints)."""
    old_task = record.task_id
    log.warning("batch %s: attempt %d after: %s", record.batch_id, attempt, why)
    task_id = submit(record, attempt, None, backend)
    next_attempt = [
        BatchRecord.task_id.set(task_id),
        BatchRecord.attempt.set(attempt),
        BatchRecord.updated_at.set(time.time()),
    ]
    update_if(
        record,
        next_attempt,
        (BatchRecord.task_id == old_task) & BatchRecord.status.is_in(*OPEN_STATES),
    )
