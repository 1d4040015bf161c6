"""What every callback route checks: the callback token, the size, the body's shape, and that
its numbers are within what the backend could have produced for that request.

A callback token is the HMAC-SHA256 of the object's id (a request or a batch) under the server's
callback secret: it proves the caller was handed that one object, it is checked in constant time
before anything else is looked at, and it is never stored.

The token proves who sent a callback, not that what it says is sane: a cluster-side bug or a
leaked token must not corrupt accounting. So each field's range is checked by its schema
(first_core.schemas.wire) and the counts against what was sent, kept on the request record:
completion tokens at most `max_tokens` x choices, prompt tokens at most the prompt's bytes (plus
the chat template's few; no bound when the prompt points at an image, audio or a file, which
count many tokens in few bytes), a stream's batch numbers at most one a generated token. These
are sanity bounds, not the reservation: a request may use more than it reserved (a default
reservation) and is charged for it. An out-of-range callback is a 400 and changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal, TypeVar

from pydantic import BaseModel, ValidationError

from first_core.errors import AuthenticationError, InvalidRequestError, PayloadTooLargeError
from first_core.settings import get_settings
from first_core.tables import RequestRecord
from first_core.usage import Usage


class MissingCallbackSecret(RuntimeError):
    """An HMAC under an empty key is no secret: refuse to sign or verify without one."""


def callback_url(object_id: str, sink: Literal["result", "stream", "batch"]) -> str:
    """Where a compute function posts back for this request or batch (chalicelib/callbacks.py):
    the gateway's public base URL, since the cluster reaches it from outside."""
    url = f"{get_settings().public_base_url.rstrip('/')}/callbacks/{object_id}"
    return url if sink == "result" else f"{url}/{sink}"


def callback_token(request_id: str) -> str:
    """The request's callback token: the HMAC-SHA256 of its id under the callback secret, in hex;
    only the cluster task sent for that request carries it."""
    secret = get_settings().callback_secret.get_secret_value().encode()
    if not secret:
        raise MissingCallbackSecret("FIRST_CALLBACK_SECRET is not set")
    return hmac.new(secret, request_id.encode(), hashlib.sha256).hexdigest()


def verify_callback_token(request_id: str, authorization: str | None) -> None:
    """Raise 401 unless the Authorization header is `Bearer` and this request's exact token,
    compared in constant time."""
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        presented = ""
    if not hmac.compare_digest(presented.encode(), callback_token(request_id).encode()):
        raise AuthenticationError(
            "Invalid callback token for this request.", code="invalid_callback"
        )


CallbackT = TypeVar("CallbackT", bound=BaseModel)


def read_callback(
    object_id: str,
    authorization: str | None,
    raw_body: bytes,
    body_type: type[CallbackT],
    max_bytes: int,
    id_field: str = "request_id",
) -> CallbackT:
    """Every callback route's first steps, in this order: the token for this object (constant
    time, before anything else is looked at), the size, the body's shape, and that the body
    names the object of the URL in its `id_field`."""
    verify_callback_token(object_id, authorization)
    if len(raw_body) > max_bytes:
        raise PayloadTooLargeError("Callback body too large.")
    try:
        body = body_type.model_validate_json(raw_body)
    except ValidationError:
        raise InvalidRequestError(
            "Malformed callback body.", code="invalid_callback_body"
        ) from None
    if getattr(body, id_field) != object_id:
        raise InvalidRequestError("Callback body names another object.", param=id_field)
    return body


# ---- bounds: what the backend could have produced for this request ------------------------------

# The record's attributes the bounds read (a callback that needs them reads only these).
BOUND_ATTRIBUTES = ["max_tokens", "choices", "prompt_bytes"]
# Prompt tokens the body does not carry: the chat template's own text (role headers, a model's
# default system prompt). A sanity bound must never refuse a real answer.
TEMPLATE_TOKENS = 512
# A stream's chunks beyond its tokens: per choice a role chunk and a finish chunk (and some
# slack), per stream the usage chunk and an error chunk.
_CHUNKS_PER_CHOICE = 8
_CHUNKS_PER_STREAM = 8


def _most_completion_tokens(record: RequestRecord) -> int | None:
    if record.max_tokens is None:
        return None
    return int(record.max_tokens) * max(1, int(record.choices or 1))


def usage_problem(record: RequestRecord, usage: Usage) -> str | None:
    """Why these counts cannot be what the backend produced for this request, or None.
    A bound the record does not know (an older record, no max_tokens sent) is not checked."""
    if min(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) < 0:
        return "Token counts cannot be negative."
    most = _most_completion_tokens(record)
    if most is not None and usage.completion_tokens > most:
        return (
            f"completion_tokens is {usage.completion_tokens}, more than the {most} the request "
            "could generate (max_tokens x choices)."
        )
    prompt = None if record.prompt_bytes is None else int(record.prompt_bytes) + TEMPLATE_TOKENS
    if prompt is not None and usage.prompt_tokens > prompt:
        return (
            f"prompt_tokens is {usage.prompt_tokens}, more than the prompt's "
            f"{int(record.prompt_bytes)} bytes (and its template) could make."
        )
    if most is not None and prompt is not None and usage.total_tokens > most + prompt:
        return f"total_tokens is {usage.total_tokens}, more than prompt and completion allow."
    return None


def seq_problem(record: RequestRecord, seq: int) -> str | None:
    """Why a stream cannot have a batch of this number, or None: every batch but the last
    carries a chunk or more, and a stream has at most a chunk a generated token, a few more."""
    most = _most_completion_tokens(record)
    if most is None:
        return None
    choices = max(1, int(record.choices or 1))
    highest = most + choices * _CHUNKS_PER_CHOICE + _CHUNKS_PER_STREAM
    if seq > highest:
        return f"seq is {seq}; this stream has at most {highest} batches."
    return None


def check_bounds(record: RequestRecord, usage: Usage | None = None, seq: int | None = None) -> None:
    """Raise 400 (the callback changes nothing) if the usage or the stream batch number is
    beyond what the backend could have produced for this request."""
    problem = usage_problem(record, usage) if usage is not None else None
    param = "usage"
    if problem is None and seq is not None:
        problem, param = seq_problem(record, seq), "seq"
    if problem is not None:
        raise InvalidRequestError(problem, param=param, code="invalid_callback_body")
