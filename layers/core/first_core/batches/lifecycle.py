"""A batch's life: **create** checks the request, routes the model to an endpoint that takes
batches, takes one of the user's concurrent-batch slots (a conditional counter,
first_core.ratelimit), writes the record and submits the cluster's batch function
(compute_funcs/batch.py) with presigned S3 URLs or cluster paths and a callback token;
**cancel** asks it to stop; **end** moves it to a terminal state once, and the one call that does
writes its usage record and gives the slot back.

Long because: these are the transitions of one state machine (the diagram in
first_core.batches), sharing its states and its one conditional update; apart, each would
import the others.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from first_core import idempotency, observability, ratelimit, schemas, storage, usage
from first_core.auth import Caller
from first_core.batches import files
from first_core.batches.budget import line_max_tokens
from first_core.callbacks import callback_token, callback_url
from first_core.compute import ComputeBackend, budget, get_backend
from first_core.errors import (
    ConflictError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
)
from first_core.registry import Endpoint, Registry, routing
from first_core.schemas.errors import to_gateway_error
from first_core.schemas.wire import BatchEvent
from first_core.settings import get_settings
from first_core.tables import BatchRecord, owned_item, update_if
from first_core.usage import Usage

log = logging.getLogger("first.batches")

OPEN_STATES = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL_STATES = ("completed", "failed", "cancelled", "expired")
COMPLETION_WINDOWS = {"24h": 24 * 3600}
# Where the clusters write an OpenAI batch's results (the bucket's `batches/` prefix).
OUTPUT_NAMES = {"output": "output.jsonl", "errors": "errors.jsonl"}


# A batch on a direct backend: its endpoint id's prefix (first_core.registry.snapshot), and the
# task id it is started with (no Globus Compute task: the batch driver runs it).
DIRECT_PREFIX = "direct:"
DIRECT_TASK = "direct"


def new_batch_id() -> str:
    """A new batch id: `batch_` and 32 hex digits."""
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
        if problem["type"] == "json_invalid":
            raise InvalidRequestError("The request body is not valid JSON.") from None
        if not problem["loc"]:
            raise InvalidRequestError("The request body must be a JSON object.") from None
        raise to_gateway_error(problem) from None


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


def create_openai(caller: Caller, raw_body: bytes, batch_id: str | None = None) -> BatchRecord:
    """Create an OpenAI batch from the caller's uploaded file: check the body, the file (the
    caller's own, purpose `batch`, one model and the batch's endpoint), the model's batch endpoint
    and the caller's slots, then submit it. Returns the record, `in_progress` once submitted; a
    refused submit fails the batch and gives the slot back."""
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
            error_entry(
                "mismatched_endpoint",
                f"The file's requests go to {', '.join(urls)}; this batch's endpoint is "
                f"{request.endpoint}.",
                param="endpoint",
            )
        )
    if len(models) != 1:
        problems.append(
            error_entry(
                "mismatched_model",
                f"A batch runs one model; the file names {len(models)}: {', '.join(models)}.",
                param="body.model",
            )
        )
    model = models[0] if models else ""
    if problems:
        # As OpenAI does: the batch exists, and failed validation, with the reasons.
        return _failed_at_validation(caller, request, model, problems, batch_id)
    route = routing.choose(Registry.current(), caller, model, for_batches=True)
    limit = route.endpoint.limits.max_tokens
    asked = int(input_file.max_tokens) if input_file.max_tokens is not None else None
    if limit is not None and asked is not None and asked > limit:
        line = int(input_file.max_tokens_line or 0)
        problem = error_entry(
            "max_tokens_exceeded",
            f"Line {line} asks for {asked} tokens; '{model}' allows at most {limit}.",
            param="body.max_tokens",
            line=line,
        )
        return _failed_at_validation(caller, request, model, [problem], batch_id)
    record = _new_record(caller, "openai", request.endpoint, route.endpoint, batch_id)
    record.input_file_id = input_file.file_id
    record.total = int(input_file.line_count or 0)
    record.completion_window = request.completion_window
    record.metadata = request.metadata
    return _start(record, input_file.s3_key)


def created_once(
    caller: Caller,
    raw_body: bytes,
    idempotency_key: str | None,
    create: Callable[[str | None], BatchRecord],
) -> BatchRecord:
    """`create(batch_id)`, or, with an Idempotency-Key the caller used before (in 24 h, with the
    same body), the batch that call created: a repeat never starts a second batch."""
    if idempotency_key is None:
        return create(None)
    batch_id = new_batch_id()
    bound = idempotency.claim(caller.user_id, idempotency_key, raw_body, batch_id)
    if bound != batch_id:
        return idempotency.first_made(lambda: get_owned(bound, caller))
    try:
        return create(batch_id)
    except Exception:
        # Refused before its record was written (a bad body, no slot): a repeat starts afresh.
        if owned_item(BatchRecord, batch_id, caller.user_id) is None:
            idempotency.release(caller.user_id, idempotency_key, batch_id)
        raise


def create_first(
    caller: Caller, cluster: str, framework: str, raw_body: bytes, batch_id: str | None = None
) -> BatchRecord:
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
    if route.endpoint.direct is not None:
        raise _no_cluster_paths(request.model)
    record = _new_record(caller, "first", "/v1/chat/completions", route.endpoint, batch_id)
    record.input_path = request.input_file
    # FIRST writes results beside the input unless told where.
    record.output_folder_path = (
        request.output_folder_path or os.path.dirname(request.input_file) or "."
    )
    return _start(record, None)


def _new_record(
    caller: Caller, kind: str, endpoint: str, served_by: Endpoint, batch_id: str | None
) -> BatchRecord:
    now = time.time()
    return BatchRecord(
        batch_id or new_batch_id(),
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
    caller: Caller,
    request: BatchCreate,
    model: str,
    problems: list[dict[str, Any]],
    batch_id: str | None,
) -> BatchRecord:
    now = time.time()
    record = BatchRecord(
        batch_id or new_batch_id(),
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
    """How many of the user's batches hold a slot now (one per batch not yet ended)."""
    return ratelimit.used(f"batches#{user_id}")


# ---- submitting ---------------------------------------------------------------------------------


def _start(record: BatchRecord, input_key: str | None) -> BatchRecord:
    """Take a slot, write the record, submit the first attempt; `in_progress` on success."""
    _take_slot(record.user_id)
    try:
        record.save()
        task_id = submit(record, attempt=1, input_key=input_key)
    except GatewayError as error:
        # Ending the batch gives the slot back; a record that was never written cannot end.
        if not end(record, "failed", errors=[error_entry("submit_failed", error.message)]):
            _give_back_slot(record.user_id)
        raise
    except Exception:
        _give_back_slot(record.user_id)
        raise
    now = time.time()
    started = [
        BatchRecord.status.set("in_progress"),
        BatchRecord.task_id.set(task_id),
        BatchRecord.in_progress_at.set(now),
        BatchRecord.updated_at.set(now),
    ]
    if not update_if(record, started, BatchRecord.status == "validating"):
        # A cancel came in between: the function will hear it at its first progress callback.
        record.refresh(consistent_read=True)
    return record


def submit(
    record: BatchRecord,
    attempt: int,
    input_key: str | None,
    backend: ComputeBackend | None = None,
) -> str:
    """Submit one attempt of the batch to its cluster's batch endpoint and return the task id; it
    may wait for a unit of the Globus Compute API budget rather than fail under load. A direct
    backend's batch has no task: the batch driver runs it (first_core.batches.direct)."""
    if record.endpoint_id.startswith(DIRECT_PREFIX):
        if record.kind != "openai":
            raise _no_cluster_paths(record.model)
        return DIRECT_TASK
    if record.kind == "openai":
        key = input_key or f"files/{record.input_file_id}.jsonl"
        source: dict[str, Any] = {"url": storage.presigned_url("GET", key)}
        output: dict[str, Any] = {"upload": True}
    else:
        source = {"path": record.input_path}
        output = {"folder": record.output_folder_path}
    # One Globus Compute call for a whole batch: it may wait for a unit like the submitter of
    # queued requests does (first_core.compute.budget), rather than fail the batch under load.
    with budget.priority(budget.Priority.SUBMITTER):
        return _submit_task(record, attempt, source, output, backend)


def _submit_task(
    record: BatchRecord,
    attempt: int,
    source: dict[str, Any],
    output: dict[str, Any],
    backend: ComputeBackend | None,
) -> str:
    settings = get_settings()
    batch_id = record.batch_id
    return (backend or get_backend()).submit(
        record.endpoint_id,
        record.function_id,
        {
            "batch_id": batch_id,
            "model": record.model,
            "input": source,
            "output": output,
            "callback_url": callback_url(batch_id, "batch"),
            "callback_token": callback_token(batch_id),
            "chunk_lines": settings.batch_chunk_lines,
            "attempt": attempt,
            # Lines are capped and take their tokens from the owner's budget as they run.
            "max_tokens": line_max_tokens(record),
            "token_budget": True,
            # The cluster keeps each user to their own directories (`{user}` in its roots).
            "owner": record.username,
        },
    )


def _no_cluster_paths(model: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"'{model}' is served by a direct backend, which reads no cluster paths: use an OpenAI "
        "batch (POST /v1/batches).",
        param="model",
        code="batches_not_supported",
    )


def error_entry(
    code: str, message: str, param: str | None = None, line: int | None = None
) -> dict[str, Any]:
    """One entry of a batch's `errors.data`, in OpenAI's shape."""
    return {"code": code, "message": message[:2000], "param": param, "line": line}


# ---- reading ------------------------------------------------------------------------------------


def get_owned(batch_id: str, caller: Caller) -> BatchRecord:
    """The batch if the caller owns it; anyone else gets the same 404 as for a missing one."""
    record = owned_item(BatchRecord, batch_id, caller.user_id)
    if record is None:
        raise NotFoundError(f"No such batch: {batch_id}", param="batch_id")
    return record


# ---- cancel -------------------------------------------------------------------------------------


def cancel(record: BatchRecord) -> BatchRecord:
    """Ask a batch to stop: `cancelling` until the cluster stops and hands back what it did."""
    if record.status in ("cancelling", "cancelled"):
        return record
    if record.status not in ("validating", "in_progress"):
        raise ConflictError(
            f"Batch {record.batch_id} is {record.status} and cannot be cancelled.",
            code="batch_not_cancellable",
        )
    now = time.time()
    cancelling = [
        BatchRecord.status.set("cancelling"),
        BatchRecord.cancelling_at.set(now),
        BatchRecord.updated_at.set(now),
    ]
    if not update_if(record, cancelling, BatchRecord.status.is_in("validating", "in_progress")):
        record.refresh(consistent_read=True)
    return record


_STATUS_TIME = {
    "completed": BatchRecord.completed_at,
    "failed": BatchRecord.failed_at,
    "cancelled": BatchRecord.cancelled_at,
    "expired": BatchRecord.expired_at,
}


def end(
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
        tokens = counts.usage
        prompt = int(tokens.get("prompt_tokens", 0))
        completion = int(tokens.get("completion_tokens", 0))
        actions += [
            BatchRecord.completed.set(counts.completed),
            BatchRecord.failed.set(counts.failed),
            BatchRecord.total.set(max(counts.total, counts.completed + counts.failed)),
            BatchRecord.resumed_lines.set(counts.resumed_lines),
            BatchRecord.prompt_tokens.set(prompt),
            BatchRecord.completion_tokens.set(completion),
            BatchRecord.total_tokens.set(int(tokens.get("total_tokens", prompt + completion))),
        ]
    for name, value in (outputs or {}).items():
        if value is not None:
            actions.append(getattr(BatchRecord, name).set(value))
    if not update_if(record, actions, BatchRecord.status.is_in(*from_states)):
        return False
    _write_usage(record)
    _give_back_slot(record.user_id)
    observability.count("Batches", Status=status, Kind=record.kind)
    for outcome in ("completed", "failed"):
        if int(getattr(record, outcome) or 0):
            observability.count("BatchLines", int(getattr(record, outcome)), Outcome=outcome)
    return True


def _write_usage(record: BatchRecord) -> None:
    """One usage record per batch, as for a request (first_core.usage)."""
    row = usage.usage_row(
        user_id=record.user_id,
        username=record.username,
        request_id=record.batch_id,
        model=record.model or "-",
        cluster=record.cluster or "-",
        openai_path=f"batches{record.endpoint}",
        stream=False,
        status=record.status,
        usage=Usage(
            int(record.prompt_tokens), int(record.completion_tokens), int(record.total_tokens)
        ),
        created=float(record.created_at),
        completed=float(record.updated_at),
    )
    try:
        usage.save_once(row)
    except Exception:
        log.exception("could not write the usage record of batch %s", record.batch_id)
