"""Results coming back from the clusters: a non-streamed answer kept on its request record, and
S3 spill-over.

The answer is written by the conditional update that ends the record, so a repeated callback is
a no-op; bodies too large for a DynamoDB item go to the results bucket with a pointer on the
record; a body over the cap (`max_payload_bytes`) is never written: the request ends failed,
saying so. (The callback's
token, shape and counts are checked first: first_core.callbacks.)
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
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
from first_core.tables import RequestRecord


@dataclass(frozen=True)
class Result:
    """A request's result: the HTTP status the cluster answered with, and the body."""

    status_code: int
    body: Any


def record(
    request_id: str, status_code: int, body: Any
) -> Literal["written", "duplicate", "refused"]:
    """End the request record once, with the answer on it, in one conditional update.

    The update that ends the record (status, usage or error, times) also writes the answer
    (`records.answer_actions`), guarded by the condition that lets a request end only once
    (`records.STILL_OPEN`): the waiting proxy, polling the record, sees the end and the answer
    together, and a repeated or late callback changes nothing and bills nothing. Only when the
    update is refused is the record read, to tell a repeat (it holds an answer: `duplicate`)
    from a request that does not exist or ended otherwise (cancelled, timed out: `refused`;
    a cancelled request's answer is billed, once, though nobody reads it).
    """
    s = get_settings()
    text = json.dumps(body, separators=(",", ":"))
    if len(text) > s.max_payload_bytes:  # every path that writes a result comes through here
        status_code, body = too_large(len(text))
        text = json.dumps(body, separators=(",", ":"))
    s3_key = None
    if len(text) > s.inline_result_bytes:
        # Too large for the record's item (400 KB at most): in the results bucket, under a key
        # of its own per attempt, so a repeat never overwrites the answer that won.
        s3_key = f"results/{request_id}/{uuid.uuid4().hex}.json"
        storage.put(s3_key, text.encode())
    usage = None
    if status_code < 400:
        try:  # checked before it came here (accept_callback, the reconciler)
            usage = answer_usage(body)
        except ValidationError:
            usage = None
    answer = records.answer_actions(status_code, None if s3_key else text, s3_key)
    ended = records.finish(
        request_id,
        "completed" if status_code < 400 else "failed",
        usage=usage,
        error=error_message(body) if status_code >= 400 else None,
        first_contact=time.time(),
        answer=answer,
    )
    if ended:
        return "written"
    if s3_key is not None:
        storage.delete(s3_key)
    try:
        current = RequestRecord.get(
            request_id, consistent_read=True, attributes_to_get=["status", "response_status"]
        )
    except DoesNotExist:
        return "refused"
    if current.response_status is not None:  # a repeat of the callback that ended it
        return "duplicate"
    if current.status == "cancelled" and usage is not None:
        records.bill_after_cancel(request_id, usage)  # its client left; what ran is billed
    return "refused"


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


def load(request_id: str) -> Result | None:
    """The answer of a non-streamed request, once its record ended with one (its body fetched
    from S3 if it is there), or None: one strongly consistent read of the record."""
    try:
        request = RequestRecord.get(request_id, consistent_read=True, attributes_to_get=_ANSWER)
    except DoesNotExist:
        return None
    return stored_answer(request)


# The record's attributes that hold its answer.
_ANSWER = ["response_status", "response_body", "response_s3_key"]


def stored_answer(request: RequestRecord) -> Result | None:
    """The answer kept on a request record (`record`; a direct backend's, `records.ended`), or
    None if it holds none."""
    if request.response_s3_key:
        # The bucket's results/ expire (`ResultsBucket`'s lifecycle, at least the result TTL)
        # while the record stays: an old record's large answer may be gone.
        stored = storage.get_if_present(request.response_s3_key)
        if stored is None:
            return None
        text = stored.decode()
    elif request.response_body is not None:
        text = request.response_body
    else:
        return None
    # A direct backend's record keeps only a completed answer, without its status.
    return Result(int(request.response_status or 200), json.loads(text))


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
    if request.status == "completed" and request.stream:
        response = assemble.answer(request.request_id, request.openai_path)
    elif request.status == "completed":
        stored = stored_answer(request)
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
