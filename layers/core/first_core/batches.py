"""Batches: OpenAI's (an uploaded input file) and FIRST's (a path on the cluster), one life.

    create ─► in_progress ─► finalizing ─► completed
       │          │  (cancel) ─► cancelling ─► cancelled
       │          └─ past the completion window ─► expired;  attempts used up ─► failed
       └─ the file does not fit the batch (endpoint, one model) ─► failed

- **create** checks the request, routes the model to an endpoint that takes batches, takes one
  of the user's concurrent-batch slots (a conditional counter, first_core.ratelimit), writes the
  record and submits the cluster's batch function (compute_funcs/batch.py) with presigned S3
  URLs or cluster paths and a callback token.
- **callbacks** (`POST /callbacks/{batch_id}/batch`, HMAC token as for requests): `progress`
  sets the counts and answers whether to go on (no after a cancel or past the window);
  `upload` answers fresh presigned PUT URLs for the output and error files; `done` finalizes.
- **finalize** moves the batch to `finalizing`, records its output files, then ends it once
  (a conditional update); the one call that ends it writes the batch's usage record and gives
  the slot back. Every step may be repeated: a lost or repeated `done` changes nothing.
- **drive** (the scheduled batch driver) looks at every open batch's task: a finished task's
  return value is its `done` report (a lost callback), a failed or vanished task (a killed
  worker, a lost node) is submitted again with the next attempt, which resumes from the
  checkpoints the function left on the cluster, until `batch_max_attempts`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pynamodb.exceptions import DoesNotExist, UpdateError

from first_core import files, ratelimit, routing, schemas, storage
from first_core.auth import Caller
from first_core.compute import ComputeBackend, get_backend
from first_core.errors import (
    ConflictError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
)
from first_core.registry import Endpoint, Registry
from first_core.results import callback_token, read_callback
from first_core.settings import get_settings
from first_core.tables import BatchRecord, UsageRecord
from first_core.usage import usage_sort_key

log = logging.getLogger("first.batches")

OPEN_STATES = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL_STATES = ("completed", "failed", "cancelled", "expired")
COMPLETION_WINDOWS = {"24h": 24 * 3600}
# Where the clusters write an OpenAI batch's results (the bucket's `batches/` prefix).
OUTPUT_NAMES = {"output": "output.jsonl", "errors": "errors.jsonl"}


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


# ---- requests -----------------------------------------------------------------------------------


class BatchCreate(BaseModel):
    """`POST /v1/batches`, as the OpenAI SDK sends it."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=200)
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    # Sent by newer SDKs; outputs here expire by the bucket's lifecycle rule instead.
    output_expires_after: dict[str, Any] | None = None


def _parse(model: type[BaseModel], raw_body: bytes) -> Any:
    if len(raw_body) > get_settings().max_payload_bytes:
        raise PayloadTooLargeError("Request body too large.")
    try:
        return model.model_validate_json(raw_body or b"{}")
    except ValidationError as error:
        problem = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in problem["loc"]) or None
        if problem["type"] == "json_invalid":
            raise InvalidRequestError("The request body is not valid JSON.") from None
        raise InvalidRequestError(
            f"{where or 'body'}: {problem['msg']}", param=where, code="invalid_value"
        ) from None


def _check_cluster_path(value: str | None, param: str) -> None:
    """A path on the cluster (relative ones are under the endpoint's first batch root), without
    `..` or NUL. The cluster checks it again against the directories its endpoint may read and
    write (FIRST_BATCH_ROOTS), where symbolic links are resolved."""
    if value is None:
        return
    if "\x00" in value or ".." in value.split("/") or len(value) > 4096:
        raise InvalidRequestError(
            f"{param} must be a path on the cluster without '..'.", param=param
        )


# ---- creating -----------------------------------------------------------------------------------


def create_openai(caller: Caller, raw_body: bytes) -> dict[str, Any]:
    request: BatchCreate = _parse(BatchCreate, raw_body)
    for key, value in (request.metadata or {}).items():
        if len(key) > 64 or len(value) > 512:
            raise InvalidRequestError(
                "metadata keys are at most 64 characters and values 512.", param="metadata"
            )
    input_file = files.get_owned(request.input_file_id, caller)
    if input_file.purpose != "batch":
        raise InvalidRequestError(
            f"File {input_file.file_id} has purpose '{input_file.purpose}', not 'batch'.",
            param="input_file_id",
        )
    models = list(input_file.models or [])
    urls = list(input_file.urls or [])
    problems = []
    if urls != [request.endpoint]:
        problems.append(
            {
                "code": "mismatched_endpoint",
                "message": f"The file's requests go to {', '.join(urls)}; this batch's "
                f"endpoint is {request.endpoint}.",
                "param": "endpoint",
                "line": None,
            }
        )
    if len(models) != 1:
        problems.append(
            {
                "code": "mismatched_model",
                "message": f"A batch runs one model; the file names {len(models)}: "
                f"{', '.join(models)}.",
                "param": "body.model",
                "line": None,
            }
        )
    model = models[0] if models else ""
    if problems:
        # As OpenAI does: the batch exists, and failed validation, with the reasons.
        return view(_failed_at_validation(caller, request, model, problems))
    route = routing.choose(Registry.current(), caller, model, for_batches=True)
    record = _new_record(caller, "openai", request.endpoint, route.endpoint)
    record.input_file_id = input_file.file_id
    record.total = int(input_file.line_count or 0)
    record.completion_window = request.completion_window
    record.metadata = request.metadata
    return view(_start(record, input_file.s3_key))


def create_first(caller: Caller, cluster: str, framework: str, raw_body: bytes) -> dict[str, Any]:
    """FIRST's batch: a JSONL file already on the cluster's file system."""
    if len(raw_body) > get_settings().max_payload_bytes:
        raise PayloadTooLargeError("Request body too large.")
    request = schemas.parse_request("batches", raw_body)
    assert isinstance(request, schemas.FirstBatchRequest)
    _check_cluster_path(request.input_file, "input_file")
    _check_cluster_path(request.output_folder_path, "output_folder_path")
    route = routing.choose(
        Registry.current(), caller, request.model, cluster, framework, for_batches=True
    )
    record = _new_record(caller, "first", "/v1/chat/completions", route.endpoint)
    record.input_path = request.input_file
    # FIRST writes results beside the input unless told where.
    record.output_folder_path = (
        request.output_folder_path or os.path.dirname(request.input_file) or "."
    )
    return first_summary(_start(record, None))


def _new_record(caller: Caller, kind: str, endpoint: str, served_by: Endpoint) -> BatchRecord:
    now = time.time()
    return BatchRecord(
        new_batch_id(),
        user_id=caller.user_id,
        username=caller.username,
        kind=kind,
        status="validating",
        open_status="open",
        endpoint=endpoint,
        model=served_by.model,
        cluster=served_by.cluster,
        framework=served_by.framework,
        endpoint_id=served_by.batch_runs_on,
        function_id=served_by.functions.batch or "",
        created_at=now,
        updated_at=now,
        expires_at=now + COMPLETION_WINDOWS["24h"],
    )


def _failed_at_validation(
    caller: Caller, request: BatchCreate, model: str, problems: list[dict[str, Any]]
) -> BatchRecord:
    now = time.time()
    record = BatchRecord(
        new_batch_id(),
        user_id=caller.user_id,
        username=caller.username,
        kind="openai",
        status="failed",
        endpoint=request.endpoint,
        model=model,
        cluster="",
        framework="",
        endpoint_id="",
        function_id="",
        input_file_id=request.input_file_id,
        completion_window=request.completion_window,
        metadata=request.metadata,
        errors=problems,
        created_at=now,
        updated_at=now,
        expires_at=now + COMPLETION_WINDOWS["24h"],
        failed_at=now,
    )
    record.save()
    return record


# ---- the per-user slots ---------------------------------------------------------------------

# Slots are a counter row that never rolls over: its window ends far away (the row expires a
# month after the last take if every give-back were lost, which errs towards more batches).
_SLOT_WINDOW_SECONDS = 30 * 86400


def _slot(user_id: str) -> ratelimit.Counter:
    return ratelimit.Counter(
        key=f"batches#{user_id}",
        limit=get_settings().max_concurrent_batches_per_user,
        window_end=time.time() + _SLOT_WINDOW_SECONDS,
        kind="batches",
    )


def _take_slot(user_id: str) -> None:
    slot = _slot(user_id)
    if not ratelimit.take(slot, 1):
        raise RateLimitError(
            f"You have {slot.limit} batches in progress, the most one user may run at once. "
            "Wait for one to end, or cancel one.",
            code="batch_limit_exceeded",
            headers={"Retry-After": "60"},
        )


def _give_back_slot(user_id: str) -> None:
    try:
        ratelimit.give_back(f"batches#{user_id}", 1, time.time() + _SLOT_WINDOW_SECONDS)
    except Exception:  # a lost give-back costs the user a slot for a while, never a batch
        log.exception("could not give back a batch slot of %s", user_id)


def slots_in_use(user_id: str) -> int:
    return ratelimit.used(f"batches#{user_id}")


# ---- submitting ---------------------------------------------------------------------------------


def _start(record: BatchRecord, input_key: str | None) -> BatchRecord:
    """Take a slot, write the record, submit the first attempt; `in_progress` on success."""
    _take_slot(record.user_id)
    try:
        record.save()
        task_id = _submit(record, attempt=1, input_key=input_key)
    except GatewayError as error:
        # Ending the batch gives the slot back; a record that was never written cannot end.
        if not _end(record, "failed", errors=[_error("submit_failed", error.message)]):
            _give_back_slot(record.user_id)
        raise
    except Exception:
        _give_back_slot(record.user_id)
        raise
    now = time.time()
    try:
        record.update(
            actions=[
                BatchRecord.status.set("in_progress"),
                BatchRecord.task_id.set(task_id),
                BatchRecord.in_progress_at.set(now),
                BatchRecord.updated_at.set(now),
            ],
            condition=BatchRecord.status == "validating",
        )
    except UpdateError as failure:
        # A cancel came in between: the function will hear it at its first progress callback.
        if failure.cause_response_code != "ConditionalCheckFailedException":
            raise
        record.refresh(consistent_read=True)
    return record


def _submit(
    record: BatchRecord,
    attempt: int,
    input_key: str | None,
    backend: ComputeBackend | None = None,
) -> str:
    settings = get_settings()
    batch_id = record.batch_id
    if record.kind == "openai":
        key = input_key or f"files/{record.input_file_id}.jsonl"
        source: dict[str, Any] = {"url": storage.presigned_url("GET", key)}
        output: dict[str, Any] = {"upload": True}
    else:
        source = {"path": record.input_path}
        output = {"folder": record.output_folder_path}
    return (backend or get_backend()).submit(
        record.endpoint_id,
        record.function_id,
        {
            "batch_id": batch_id,
            "model": record.model,
            "input": source,
            "output": output,
            "callback_url": f"{settings.public_base_url.rstrip('/')}/callbacks/{batch_id}/batch",
            "callback_token": callback_token(batch_id),
            "chunk_lines": settings.batch_chunk_lines,
            "attempt": attempt,
        },
    )


def _error(code: str, message: str, line: int | None = None) -> dict[str, Any]:
    return {"code": code, "message": message[:2000], "param": None, "line": line}


# ---- reading ------------------------------------------------------------------------------------


def get_owned(batch_id: str, caller: Caller) -> BatchRecord:
    """The batch if the caller owns it; anyone else gets the same 404 as for a missing one."""
    try:
        record = BatchRecord.get(batch_id, consistent_read=True)
    except DoesNotExist:
        record = None
    if record is None or record.user_id != caller.user_id:
        raise NotFoundError(f"No such batch: {batch_id}", param="batch_id")
    return record


def _int(value: Any) -> int | None:
    return int(value) if value is not None else None


def view(record: BatchRecord) -> dict[str, Any]:
    """OpenAI's Batch object (with `model`, `usage` and FIRST's own fields beside it)."""
    done = record.status in TERMINAL_STATES
    return {
        "id": record.batch_id,
        "object": "batch",
        "endpoint": record.endpoint,
        "model": record.model,
        "errors": {"object": "list", "data": record.errors} if record.errors else None,
        "input_file_id": record.input_file_id or record.input_path,
        "completion_window": record.completion_window,
        "status": record.status,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "created_at": int(record.created_at),
        "in_progress_at": _int(record.in_progress_at),
        "expires_at": int(record.expires_at),
        "finalizing_at": _int(record.finalizing_at),
        "completed_at": _int(record.completed_at),
        "failed_at": _int(record.failed_at),
        "expired_at": _int(record.expired_at),
        "cancelling_at": _int(record.cancelling_at),
        "cancelled_at": _int(record.cancelled_at),
        "request_counts": {
            "total": int(record.total),
            "completed": int(record.completed),
            "failed": int(record.failed),
        },
        "metadata": record.metadata,
        "usage": {
            "input_tokens": int(record.prompt_tokens),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": int(record.completion_tokens),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": int(record.total_tokens),
        }
        if done
        else None,
        # FIRST's: where it ran, how often it was (re)started, what the last start resumed.
        "cluster": record.cluster or None,
        "attempts": int(record.attempt),
        "resumed_lines": int(record.resumed_lines),
    }


def list_page(caller: Caller, limit: int, after: str | None) -> dict[str, Any]:
    """The caller's batches, newest first, as OpenAI's cursor page."""
    condition = None
    if after:
        condition = BatchRecord.created_at < get_owned(after, caller).created_at
    page: list[BatchRecord] = []
    has_more = False
    for record in BatchRecord.by_user.query(caller.user_id, condition, scan_index_forward=False):
        if len(page) == limit:
            has_more = True
            break
        page.append(record)
    return files.cursor_page([view(r) for r in page], has_more)


# FIRST's names for the states (its clients read these).
_FIRST_STATUS = {
    "validating": "pending",
    "in_progress": "running",
    "finalizing": "running",
    "cancelling": "running",
    "completed": "completed",
    "failed": "failed",
    "expired": "failed",
    "cancelled": "cancelled",
}


def first_status(record: BatchRecord) -> str:
    return _FIRST_STATUS[record.status]


def first_summary(record: BatchRecord) -> dict[str, Any]:
    """FIRST's batch summary (its list and submit answers)."""

    def iso(value: Any) -> str | None:
        if value is None:
            return None
        return datetime.fromtimestamp(float(value), tz=UTC).isoformat()

    return {
        "batch_id": record.batch_id,
        "id": record.batch_id,
        "cluster": record.cluster,
        "framework": record.framework,
        "model": record.model,
        "input_file": record.input_path or record.input_file_id,
        "output_folder_path": record.output_folder_path,
        "status": first_status(record),
        "created_at": iso(record.created_at),
        "in_progress_at": iso(record.in_progress_at),
        "completed_at": iso(record.completed_at),
        "failed_at": iso(record.failed_at or record.expired_at),
    }


def first_list(caller: Caller, status: str | None) -> list[dict[str, Any]]:
    if status is not None and status not in set(_FIRST_STATUS.values()):
        raise InvalidRequestError(
            f"status must be one of {', '.join(sorted(set(_FIRST_STATUS.values())))}.",
            param="status",
        )
    summaries = [
        first_summary(r)
        for r in BatchRecord.by_user.query(caller.user_id, scan_index_forward=False)
    ]
    return [s for s in summaries if status is None or s["status"] == status]


def first_result(record: BatchRecord) -> dict[str, Any]:
    """FIRST's result: where the cluster wrote the answers, once the batch has ended well."""
    if record.status in ("failed", "expired"):
        reasons = "; ".join(e.get("message", "") for e in record.errors or []) or record.status
        raise InvalidRequestError(f"Batch {record.status}: {reasons}", code="batch_failed")
    if record.status not in ("completed", "cancelled"):
        raise ConflictError(
            f"Batch {record.batch_id} is {record.status}; its results are not ready.",
            code="batch_not_completed",
        )
    return {
        "batch_id": record.batch_id,
        "status": first_status(record),
        "output_file": record.output_path,
        "error_file": record.error_path,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "request_counts": view(record)["request_counts"],
        "usage": view(record)["usage"],
    }


# ---- cancel -------------------------------------------------------------------------------------


def cancel(record: BatchRecord) -> dict[str, Any]:
    """Ask a batch to stop: `cancelling` until the cluster stops and hands back what it did."""
    if record.status in ("cancelling", "cancelled"):
        return view(record)
    if record.status not in ("validating", "in_progress"):
        raise ConflictError(
            f"Batch {record.batch_id} is {record.status} and cannot be cancelled.",
            code="batch_not_cancellable",
        )
    now = time.time()
    try:
        record.update(
            actions=[
                BatchRecord.status.set("cancelling"),
                BatchRecord.cancelling_at.set(now),
                BatchRecord.updated_at.set(now),
            ],
            condition=BatchRecord.status.is_in("validating", "in_progress"),
        )
    except UpdateError as failure:
        if failure.cause_response_code != "ConditionalCheckFailedException":
            raise
        record.refresh(consistent_read=True)
    return view(record)


# ---- callbacks ----------------------------------------------------------------------------------


class Counts(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lines: int = Field(default=0, ge=0)
    bytes: int = Field(default=0, ge=0)
    path: str | None = None


class BatchEvent(BaseModel):
    """What the batch function posts (and, for `done`, returns to Globus Compute)."""

    model_config = ConfigDict(extra="ignore")

    batch_id: str
    event: Literal["progress", "upload", "done"]
    attempt: int = Field(ge=1)
    completed: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0)
    resumed_lines: int = Field(default=0, ge=0)
    outcome: Literal["completed", "cancelled", "failed"] | None = None
    usage: dict[str, int] = Field(default_factory=dict)
    output: Counts = Counts()
    errors: Counts = Counts()
    error: dict[str, Any] | None = None


def accept_callback(batch_id: str, authorization: str | None, raw_body: bytes) -> dict[str, Any]:
    event = read_callback(
        batch_id, authorization, raw_body, BatchEvent, get_settings().max_payload_bytes
    )
    try:
        record = BatchRecord.get(batch_id, consistent_read=True)
    except DoesNotExist:
        raise ConflictError(f"Batch {batch_id} does not exist.") from None
    if event.event == "progress":
        return {"continue": progress(record, event)}
    if event.event == "upload":
        return upload_urls(record, event)
    return {"accepted": finalize(record, event)}


def _current(record: BatchRecord, event: BatchEvent) -> bool:
    """The batch is not over and the event is not from an attempt the driver replaced (a new
    attempt may call back before the driver has recorded its task)."""
    return record.status in OPEN_STATES and event.attempt >= int(record.attempt)


def progress(record: BatchRecord, event: BatchEvent) -> bool:
    """Record the counts; whether the cluster should go on."""
    if not _current(record, event):
        return False  # an attempt the driver gave up on, or an ended batch: stop
    now = time.time()
    try:
        record.update(
            actions=[
                BatchRecord.completed.set(event.completed),
                BatchRecord.failed.set(event.failed),
                BatchRecord.total.set(event.total),
                BatchRecord.resumed_lines.set(event.resumed_lines),
                BatchRecord.updated_at.set(now),
            ],
            condition=BatchRecord.status.is_in(*OPEN_STATES)
            & (BatchRecord.attempt <= event.attempt),
        )
    except UpdateError as failure:
        if failure.cause_response_code != "ConditionalCheckFailedException":
            raise
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
    if record.status != "finalizing":
        try:
            record.update(
                actions=[
                    BatchRecord.status.set("finalizing"),
                    BatchRecord.finalizing_at.set(now),
                    BatchRecord.updated_at.set(now),
                ],
                condition=BatchRecord.status.is_in("validating", "in_progress", "cancelling"),
            )
        except UpdateError as failure:
            if failure.cause_response_code != "ConditionalCheckFailedException":
                raise
            record.refresh(consistent_read=True)
            if record.status != "finalizing":
                return False
    outputs: dict[str, Any] = {}
    problems: list[dict[str, Any]] = []
    if event.error:
        problems.append(
            _error(str(event.error.get("code", "batch_error")), str(event.error.get("message")))
        )
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
            problems.append(_error("output_missing", f"The cluster did not deliver {key}."))
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
    return _end(
        record,
        status,
        errors=problems or None,
        counts=event,
        outputs=outputs,
        from_states=("finalizing",),
    )


_STATUS_TIME = {
    "completed": BatchRecord.completed_at,
    "failed": BatchRecord.failed_at,
    "cancelled": BatchRecord.cancelled_at,
    "expired": BatchRecord.expired_at,
}


def _end(
    record: BatchRecord,
    status: str,
    errors: list[dict[str, Any]] | None = None,
    counts: BatchEvent | None = None,
    outputs: dict[str, Any] | None = None,
    from_states: tuple[str, ...] = OPEN_STATES,
) -> bool:
    """Move the batch to a terminal state once; the call that does writes its usage record and
    gives the user's slot back (True)."""
    now = time.time()
    actions: list[Any] = [
        BatchRecord.status.set(status),
        BatchRecord.open_status.remove(),
        BatchRecord.updated_at.set(now),
        _STATUS_TIME[status].set(now),
    ]
    if errors:
        actions.append(BatchRecord.errors.set(errors))
    if counts is not None:
        usage = counts.usage
        prompt = int(usage.get("prompt_tokens", 0))
        completion = int(usage.get("completion_tokens", 0))
        actions += [
            BatchRecord.completed.set(counts.completed),
            BatchRecord.failed.set(counts.failed),
            BatchRecord.total.set(max(counts.total, counts.completed + counts.failed)),
            BatchRecord.resumed_lines.set(counts.resumed_lines),
            BatchRecord.prompt_tokens.set(prompt),
            BatchRecord.completion_tokens.set(completion),
            BatchRecord.total_tokens.set(int(usage.get("total_tokens", prompt + completion))),
        ]
    for name, value in (outputs or {}).items():
        if value is not None:
            actions.append(getattr(BatchRecord, name).set(value))
    try:
        record.update(actions=actions, condition=BatchRecord.status.is_in(*from_states))
    except UpdateError as failure:
        if failure.cause_response_code == "ConditionalCheckFailedException":
            return False
        raise
    _write_usage(record)
    _give_back_slot(record.user_id)
    return True


def _write_usage(record: BatchRecord) -> None:
    """One usage record per batch (key: the batch's creation time and id, so a repeat finds it)."""
    s = get_settings()
    created = float(record.created_at)
    completed = float(record.updated_at)
    row = UsageRecord(
        record.user_id,
        usage_sort_key(created, record.batch_id),
        date=datetime.fromtimestamp(created, tz=UTC).strftime("%Y-%m-%d"),
        request_id=record.batch_id,
        username=record.username,
        model=record.model or "-",
        cluster=record.cluster or "-",
        openai_path=f"batches{record.endpoint}",
        stream=False,
        status=record.status,
        prompt_tokens=int(record.prompt_tokens),
        completion_tokens=int(record.completion_tokens),
        total_tokens=int(record.total_tokens),
        created_at=created,
        completed_at=completed,
        total_ms=max(0, round((completed - created) * 1000)),
        expires_at=datetime.fromtimestamp(completed + s.usage_retention_days * 86400, tz=UTC),
    )
    try:
        row.save(condition=UsageRecord.sk.does_not_exist())
    except Exception:
        log.exception("could not write the usage record of batch %s", record.batch_id)


# ---- the batch driver (scheduled) ---------------------------------------------------------------


@dataclass
class DriveReport:
    checked: int = 0
    finalized: list[str] = field(default_factory=list)
    resubmitted: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "finalized": self.finalized,
            "resubmitted": self.resubmitted,
            "ended": self.ended,
            "errors": self.errors,
        }


def drive(now: float | None = None, backend: ComputeBackend | None = None) -> DriveReport:
    """Look at every open batch's task once; see the module docstring."""
    now = time.time() if now is None else now
    report = DriveReport()
    for record in BatchRecord.by_open_status.query("open"):
        report.checked += 1
        try:
            _drive_one(record, now, backend or get_backend(), report)
        except Exception as error:  # one bad batch must not stop the others
            log.exception("could not drive batch %s", record.batch_id)
            report.errors.append(f"{record.batch_id}: {type(error).__name__}: {error}")
    return report


def _drive_one(
    record: BatchRecord, now: float, backend: ComputeBackend, report: DriveReport
) -> None:
    batch_id = record.batch_id
    grace = get_settings().reconcile_grace_seconds
    if not record.task_id:
        # `_start` writes the task id right after the submit; one missing for long never ran.
        never_ran = now - float(record.created_at) > grace
        if never_ran and _end(record, "failed", errors=[_error("not_submitted", "No task.")]):
            report.ended.append(batch_id)
        return
    state = backend.task_state(record.task_id)
    if state.status == "success":
        try:
            event: BatchEvent | None = BatchEvent.model_validate(state.result)
        except ValidationError:
            event = None
        if event is not None and event.event == "done":
            if finalize(record, event):
                report.finalized.append(batch_id)
            return
        reason = "The batch task ended without a report."
        if _end(record, "failed", errors=[_error("no_report", reason)]):
            report.ended.append(batch_id)
        return
    if state.status == "pending":
        # Past the window, a task still pending never started or stopped calling back.
        overdue = now > float(record.expires_at) + grace
        status = "cancelled" if record.status == "cancelling" else "expired"
        if overdue and _end(record, status):
            report.ended.append(batch_id)
        return
    # failed or unknown: the task died (a killed worker, a lost node, a vanished task)
    if record.status == "cancelling" or now > float(record.expires_at):
        status = "cancelled" if record.status == "cancelling" else "expired"
        if _end(record, status, errors=[_error("task_failed", state.error or "task failed")]):
            report.ended.append(batch_id)
        return
    attempt = int(record.attempt)
    if attempt >= get_settings().batch_max_attempts:
        reason = f"The batch task failed {attempt} times; last: {state.error or 'unknown'}"
        if _end(record, "failed", errors=[_error("task_failed", reason)]):
            report.ended.append(batch_id)
        return
    _resubmit(record, attempt + 1, state.error, backend)
    report.resubmitted.append(batch_id)


def _resubmit(
    record: BatchRecord, attempt: int, why: str | None, backend: ComputeBackend
) -> None:
    """Start the next attempt; it resumes from the cluster's checkpoints. The update is
    conditioned on the task it replaces, so only one driver's task is recorded (another's
    carries the same attempt number and would write the same checkpoints)."""
    old_task = record.task_id
    log.warning("batch %s: attempt %d after: %s", record.batch_id, attempt, why)
    task_id = _submit(record, attempt, None, backend)
    try:
        record.update(
            actions=[
                BatchRecord.task_id.set(task_id),
                BatchRecord.attempt.set(attempt),
                BatchRecord.updated_at.set(time.time()),
            ],
            condition=(BatchRecord.task_id == old_task) & BatchRecord.status.is_in(*OPEN_STATES),
        )
    except UpdateError as failure:
        if failure.cause_response_code != "ConditionalCheckFailedException":
            raise
