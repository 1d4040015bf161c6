"""Results coming back from the clusters: the results table, and S3 spill-over.

The result row is written with a conditional put, so a repeated callback is a no-op; bodies too
large for a DynamoDB item go to the results bucket with a pointer in the row; a body over the
cap (`max_payload_bytes`) is never written: the request ends failed, saying so. (The callback's
token, shape and counts are checked first: first_core.callbacks.)
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError
from pynamodb.exceptions import DoesNotExist

from first_core import storage
from first_core.callbacks import BOUND_ATTRIBUTES, check_bounds, read_callback
from first_core.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
)
from first_core.inference import assemble, records
from first_core.schemas.wire import CallbackBody, answer_usage
from first_core.settings import get_settings
from first_core.tables import RequestRecord, ResultRecord, put_once


@dataclass(frozen=True)
class Result:
    """A request's result: the HTTP status the cluster answered with, and the body."""

    status_code: int
    body: Any


def record(
    request_id: str, status_code: int, body: Any
) -> Literal["written", "duplicate", "refused"]:
    """Write the result once, then end the request record once.

    Single-item writes in an order that makes every step safe to repeat (moto copies every
    table on each transaction, so a transaction here would slow the local stack as it fills).
    The result row goes first, so the waiting proxy sees it after one write; a repeat finds it
    there (`duplicate`) and only re-tries ending the request, which heals a callback that died
    between the two writes. A result for a request that does not exist or ended otherwise
    (cancelled, timed out) is taken back (`refused`): only then is the record read.
    """
    s = get_settings()
    text = json.dumps(body, separators=(",", ":"))
    if len(text) > s.max_payload_bytes:  # every path that writes a result comes through here
        status_code, body = too_large(len(text))
        text = json.dumps(body, separators=(",", ":"))
    now = time.time()
    row = ResultRecord(
        request_id,
        status_code=status_code,
        created_at=now,
        expires_at=datetime.fromtimestamp(now + s.result_ttl_seconds, tz=UTC),
    )
    if len(text) <= s.inline_result_bytes:
        row.body = text
    else:
        # A key of its own per attempt: a repeat must not overwrite the result that won.
        row.s3_key = f"results/{request_id}/{uuid.uuid4().hex}.json"
        storage.put(row.s3_key, text.encode())
    if not put_once(row, ResultRecord.request_id.does_not_exist()):
        _delete_body(row)
        stored = load(request_id)
        if stored is not None:
            _end_request(request_id, stored.status_code, stored.body)
        return "duplicate"
    if _end_request(request_id, status_code, body, first_contact=now):
        return "written"
    try:
        status = RequestRecord.get(request_id, consistent_read=True, attributes_to_get=["status"])
        ended_by_this_result = status.status == ("completed" if status_code < 400 else "failed")
    except DoesNotExist:
        status, ended_by_this_result = None, False
    if ended_by_this_result:  # a concurrent repeat of this callback ended it first
        return "written"
    try:
        usage = answer_usage(body) if status_code < 400 else None
    except ValidationError:  # checked before it was written; nothing to bill if not
        usage = None
    if status is not None and status.status == "cancelled" and usage is not None:
        records.bill_after_cancel(request_id, usage)  # its client left; what ran is billed
    row.delete()
    _delete_body(row)
    return "refused"


def _end_request(
    request_id: str, status_code: int, body: Any, first_contact: float | None = None
) -> bool:
    """End the request as its result says; `first_contact`, the result row's time, when this
    call wrote it."""
    if status_code < 400:
        # The usage was checked before the result was written (accept_callback, the reconciler).
        try:
            usage = answer_usage(body)
        except ValidationError:  # only a result stored before usage was checked
            usage = None
        return records.finish(request_id, "completed", usage=usage, first_contact=first_contact)
    return records.finish(
        request_id, "failed", error=error_message(body), first_contact=first_contact
    )


def too_large(size: int | None = None) -> tuple[int, dict[str, Any]]:
    """The status and OpenAI-shaped error a request ends with when the backend's answer is over
    the cap (`max_payload_bytes`): it is not written, and the waiting client gets this."""
    cap = get_settings().max_payload_bytes
    size_words = f"is {size} bytes, more than" if size is not None else "is over"
    message = (
        f"The model's answer {size_words} the gateway's limit of {cap} bytes. "
        "Ask for less in one request (fewer inputs, a smaller n or max_tokens)."
    )
    error = {"message": message, "type": "server_error", "param": None, "code": "result_too_large"}
    return 502, {"error": error}


def answer_problem(
    request_id: str, status_code: int, body: Any, request: RequestRecord | None = None
) -> str | None:
    """Why a successful answer's usage cannot be what the backend produced for this request
    (its schema, then its bounds: first_core.callbacks), or None. Reads the request's bounds
    unless given its record."""
    if status_code >= 400:
        return None  # a failure is not billed: its usage is not read
    try:
        usage = answer_usage(body)
    except ValidationError as error:
        return validation_problem(error, "usage")
    if usage is None:
        return None
    if request is None:
        try:
            request = RequestRecord.get(
                request_id, consistent_read=True, attributes_to_get=BOUND_ATTRIBUTES
            )
        except DoesNotExist:
            return None  # `record` refuses it
    try:
        check_bounds(request, usage=usage)
    except InvalidRequestError as error:
        return error.message
    return None


def _delete_body(row: ResultRecord) -> None:
    if row.s3_key:
        storage.delete(row.s3_key)


def load(request_id: str) -> Result | None:
    """The recorded result of a request (its body fetched from S3 if it spilled there), or None."""
    try:
        row = ResultRecord.get(request_id, consistent_read=True)
    except DoesNotExist:
        return None
    text = storage.get(row.s3_key) if row.s3_key else (row.body or "null")
    return Result(int(row.status_code), json.loads(text))


def accept_callback(request_id: str, authorization: str | None, raw_body: bytes) -> dict[str, Any]:
    """The callback route: verify the token, check the answer's counts against the request
    (400, nothing written), then record the result once. An answer over the cap ends the request
    failed (the client gets a clear error) and is refused with 413."""
    try:
        callback = read_callback(
            request_id, authorization, raw_body, CallbackBody, get_settings().max_payload_bytes
        )
    except PayloadTooLargeError:
        # Raised only once the token is verified: the request is this caller's to end.
        record(request_id, *too_large(len(raw_body)))
        raise
    problem = answer_problem(request_id, callback.status_code, callback.body)
    if problem is not None:
        raise InvalidRequestError(problem, param="usage", code="invalid_callback_body")
    outcome = record(request_id, callback.status_code, callback.body)
    if outcome == "refused":
        raise ConflictError(f"Request {request_id} does not exist or has already ended.")
    return {"accepted": outcome == "written", "duplicate": outcome == "duplicate"}


def validation_problem(error: ValidationError, prefix: str) -> str:
    """The first problem pydantic found, in a few words: `usage.prompt_tokens: ...`."""
    problem = error.errors(include_url=False)[0]
    where = ".".join([prefix, *(str(part) for part in problem["loc"])])
    return f"{where}: {problem['msg']}"


def error_message(body: Any) -> str:
    """The message of an error body (OpenAI-shaped or not), for the request record."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(body.get("message", error))
    return str(body)


def stored_response(request: RequestRecord) -> Any:
    """`GET /v1/responses/{request_id}`: the `response` object a completed Responses API
    request answered (a stream's is its `response.completed` event's)."""
    if request.openai_path != "responses":
        raise NotFoundError(f"Request {request.request_id} is not a Responses API request.")
    response = request_view(request)["response"]
    if response is None:
        raise NotFoundError(
            f"Request {request.request_id} has no stored response ({request.status}); "
            f"GET /v1/requests/{request.request_id} shows its state."
        )
    return response


def request_view(request: RequestRecord) -> dict[str, Any]:
    """`GET /v1/requests/{id}`: the request's state and, once it completed, its answer."""
    usage = None
    if request.total_tokens is not None:
        usage = {
            "prompt_tokens": int(request.prompt_tokens or 0),
            "completion_tokens": int(request.completion_tokens or 0),
            "total_tokens": int(request.total_tokens or 0),
        }
    response = None
    if request.status == "completed" and request.response_body is not None:
        response = json.loads(request.response_body)  # a direct backend's answer
    elif request.status == "completed" and request.stream:
        response = assemble.answer(request.request_id, request.openai_path)
    elif request.status == "completed":
        stored = load(request.request_id)
        response = stored.body if stored is not None else None
    return {
        "id": request.request_id,
        "object": "request",
        "status": request.status,
        "model": request.model,
        "cluster": request.cluster,
        "stream": bool(request.stream),
        "created_at": int(request.created_at),
        "completed_at": int(request.completed_at) if request.completed_at else None,
        "usage": usage,
        "error": request.error,
        "response": response,
    }
