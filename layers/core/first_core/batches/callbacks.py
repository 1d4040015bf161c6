"""What the cluster's batch function reports (`POST /callbacks/{batch_id}/batch`, the HMAC
token of the batch as for requests), and the finalization of a batch.

- `progress` sets the counts and answers whether to go on (no after a cancel, past the window,
  or to an attempt the driver has replaced);
- `upload` answers fresh presigned PUT URLs for the output and error files (minted when the
  cluster is ready to write, so a batch that ran longer than any URL lives still delivers);
- `tokens` takes the next lines' tokens from the owner's budget (first_core.batches.budget);
- `done` finalizes: the batch moves to `finalizing`, its output files are recorded (ids fixed by
  the batch), then it ends once (first_core.batches.end). Every step may be repeated: a lost or
  repeated `done` changes nothing; the batch driver replays a lost one from the task's return.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from pynamodb.exceptions import DoesNotExist

from first_core import storage
from first_core.batches import budget, files
from first_core.batches.lifecycle import OPEN_STATES, OUTPUT_NAMES, end, error_entry
from first_core.callbacks import read_callback
from first_core.errors import ConflictError, InvalidRequestError, public_message
from first_core.schemas.wire import BatchEvent
from first_core.settings import get_settings
from first_core.tables import BatchRecord, FileRecord, update_if


def accept_callback(batch_id: str, authorization: str | None, raw_body: bytes) -> dict[str, Any]:
    """The batch callback route: verify the token, then apply the event once: `progress` records the
    counts and answers whether to go on, `upload` answers presigned PUT urls for the outputs, `done`
    ends the batch (409 for a batch that does not exist)."""
    event = read_callback(
        batch_id,
        authorization,
        raw_body,
        BatchEvent,
        get_settings().max_payload_bytes,
        id_field="batch_id",
    )
    try:
        record = BatchRecord.get(batch_id, consistent_read=True)
    except DoesNotExist:
        raise ConflictError(f"Batch {batch_id} does not exist.") from None
    problem = event_problem(record, event)
    if problem is not None:  # a 400 that changes nothing
        raise InvalidRequestError(problem, code="invalid_callback_body")
    if event.event == "progress":
        return {"continue": progress(record, event)}
    if event.event == "upload":
        return upload_urls(record, event)
    if event.event == "tokens":
        if not _current(record, event):
            return {"continue": False}
        return budget.tokens(record, event, _running(event))
    return {"accepted": finalize(record, event)}


def event_problem(record: BatchRecord, event: BatchEvent) -> str | None:
    """Why the event's counts cannot be this batch's, or None: lines at most the batch's lines
    (an OpenAI batch's input file was counted at upload; a FIRST batch's file is on the cluster,
    so its own `total` bounds it), prompt tokens at most the input file's bytes (the schema
    already refused negatives and numbers out of range: first_core.schemas.wire)."""
    known = int(record.total or 0) if record.kind == "openai" else None
    if known is not None and event.total > known:
        return f"total is {event.total}; the batch has {known} lines."
    lines = known if known is not None else event.total
    for name, count in (
        ("completed + failed", event.completed + event.failed),
        ("resumed_lines", event.resumed_lines),
        ("output.lines + errors.lines", event.output.lines + event.errors.lines),
    ):
        if count > lines:
            return f"{name} is {count}; the batch has {lines} lines."
    prompt = event.usage.get("prompt_tokens", 0)
    if prompt and record.kind == "openai" and record.input_file_id:
        try:
            size = int(FileRecord.get(record.input_file_id, attributes_to_get=["bytes"]).bytes)
        except DoesNotExist:  # the input file was deleted since: no bound known
            return None
        if prompt > size:
            return f"usage.prompt_tokens is {prompt}, more than the input file's {size} bytes."
    return None


def _current(record: BatchRecord, event: BatchEvent) -> bool:
    """The batch is not over and the event is not from an attempt the driver replaced (a new
    attempt may call back before the driver has recorded its task)."""
    return record.status in OPEN_STATES and event.attempt >= int(record.attempt)


def _running(event: BatchEvent) -> Any:
    """The condition under which the batch's attempt may still run lines."""
    return BatchRecord.status.is_in("validating", "in_progress") & (
        BatchRecord.attempt <= event.attempt
    )


def progress(record: BatchRecord, event: BatchEvent) -> bool:
    """Record the counts; whether the cluster should go on."""
    if not _current(record, event):
        return False  # an attempt the driver gave up on, or an ended batch: stop
    now = time.time()
    counts = [
        BatchRecord.completed.set(event.completed),
        BatchRecord.failed.set(event.failed),
        BatchRecord.total.set(event.total),
        BatchRecord.resumed_lines.set(event.resumed_lines),
        BatchRecord.updated_at.set(now),
    ]
    still_current = BatchRecord.status.is_in(*OPEN_STATES) & (BatchRecord.attempt <= event.attempt)
    if not update_if(record, counts, still_current):
        return False
    # `validating`: the submit has not been recorded yet, the task is already running.
    return record.status in ("validating", "in_progress") and now < float(record.expires_at)


def _output_key(batch_id: str, which: str) -> str:
    return f"batches/{batch_id}/{OUTPUT_NAMES[which]}"


def upload_urls(record: BatchRecord, event: BatchEvent) -> dict[str, Any]:
    """Fresh presigned PUTs for the results: minted when the cluster is ready to write, so a
    batch that ran longer than any URL lives still delivers."""
    if record.kind != "openai" or not _current(record, event):
        return {"continue": False}
    return {
        "continue": True,
        "output_url": storage.presigned_url("PUT", _output_key(record.batch_id, "output")),
        "error_url": storage.presigned_url("PUT", _output_key(record.batch_id, "errors")),
    }


def _file_id(batch_id: str, which: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{which}".encode()).hexdigest()[:32]


def finalize(record: BatchRecord, event: BatchEvent) -> bool:
    """Record the outputs and end the batch once (True for the call that ended it)."""
    if not _current(record, event):
        return False
    now = time.time()
    finalizing = [
        BatchRecord.status.set("finalizing"),
        BatchRecord.finalizing_at.set(now),
        BatchRecord.updated_at.set(now),
    ]
    running = BatchRecord.status.is_in("validating", "in_progress", "cancelling")
    if record.status != "finalizing" and not update_if(record, finalizing, running):
        record.refresh(consistent_read=True)
        if record.status != "finalizing":  # a concurrent `done` is finalizing it: go on too
            return False
    outputs: dict[str, Any] = {}
    problems: list[dict[str, Any]] = []
    if event.error:
        code = str(event.error.get("code", "batch_error"))
        # The cluster's words, without the class names or addresses they may carry.
        problems.append(error_entry(code, public_message(str(event.error.get("message")))))
    for which, counts, attribute in (
        ("output", event.output, "output_file_id"),
        ("errors", event.errors, "error_file_id"),
    ):
        if record.kind == "first":
            outputs["output_path" if which == "output" else "error_path"] = counts.path
            continue
        if counts.lines == 0:
            continue
        key = _output_key(record.batch_id, which)
        size = storage.size(key)
        if size is None:
            problems.append(error_entry("output_missing", f"The cluster did not deliver {key}."))
            continue
        file_id = _file_id(record.batch_id, which)
        name = f"{record.batch_id}_{OUTPUT_NAMES[which]}"
        files.register_output(file_id, record.user_id, name, key, size, counts.lines)
        outputs[attribute] = file_id

    if event.outcome == "failed" or (problems and event.outcome == "completed"):
        status = "failed"
    elif event.outcome == "cancelled":  # told to stop: by a cancel, or by the window
        expired = not record.cancelling_at and now >= float(record.expires_at)
        status = "expired" if expired else "cancelled"
    else:
        status = "completed"
    return end(
        record,
        status,
        errors=problems or None,
        counts=event,
        outputs=outputs,
        from_states=("finalizing",),
    )
