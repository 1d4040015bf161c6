"""The one error hierarchy of the gateway, and its one mapping to HTTP.

Every refusal the gateway makes is a `GatewayError`. Handlers never build error bodies
themselves: they catch `GatewayError` and call `to_response_body()`; the status and the
OpenAI `type` come from the class, so the OpenAI SDK raises the matching exception
(`AuthenticationError` for 401, `PermissionDeniedError` for 403, ...).
"""

from __future__ import annotations

import re
from typing import Any


class GatewayError(Exception):
    """Base of every error that reaches a client."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        # A message may quote what the client sent; a lone surrogate in it could not be encoded
        # as UTF-8, and the answer itself would fail (a 500 instead of this refusal).
        self.message = encodable(message)
        self.param = encodable(param) if param is not None else None
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = headers or {}

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(GatewayError):
    """The body or a parameter is wrong (400 → `openai.BadRequestError`)."""

    status = 400
    type = "invalid_request_error"


class PayloadTooLargeError(InvalidRequestError):
    """413: the body or a file is over its limit."""

    status = 413
    code = "payload_too_large"


class AuthenticationError(GatewayError):
    """No usable token, or a session we cannot accept (401 → `openai.AuthenticationError`)."""

    status = 401
    type = "authentication_error"
    code = "invalid_token"


class PermissionDeniedError(GatewayError):
    """Authenticated, but not allowed (403 → `openai.PermissionDeniedError`)."""

    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFoundError(GatewayError):
    """Unknown model, cluster, route or object, or one the caller does not own (404)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ConflictError(GatewayError):
    """409: the object is not in a state that allows this."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimitError(GatewayError):
    """429: a rate limit or a quota; Retry-After says when to come back."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(GatewayError):
    """The cluster or vLLM failed the request (502)."""

    status = 502
    type = "server_error"
    code = "upstream_error"


class ServiceUnavailableError(GatewayError):
    """503: a cluster, Globus or AWS cannot serve this now; Retry-After when known."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


# The OpenAI SDKs honour this header over their own rules: "false" where a retry would only
# start another job (the first one still runs) or cannot succeed within their back-off.
NO_RETRY = {"x-should-retry": "false"}


class ComputeTimeoutError(GatewayError):
    """The synchronous wait for a result ran out; the request id lets the client come back.
    Never retried: the request still runs, and a retry would run it a second time."""

    status = 504
    type = "timeout_error"
    code = "compute_timeout"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={**NO_RETRY, **(headers or {})})


def encodable(text: str) -> str:
    """`text` with any lone surrogate (which UTF-8 cannot encode) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


_SURROGATE = re.compile("[\ud800-\udfff]")


# What must not reach a client in a message that came from an exception or a remote body:
# exception class names (`ConnectError: `, `builtins.RuntimeError: `), addresses (URLs, IPs,
# host:port), and traceback frames. The detail goes to the log where the message is made.
_CLASS_NAME = re.compile(
    r"\b(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Failed|Failure|Timeout|Pool|Exit)\b:?\s*"
)
_ADDRESS = re.compile(
    r"\b[a-zA-Z][\w+.-]*://[^\s'\"<>]+"  # a URL
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"  # an IPv4 address, with its port
    r"|\b(?:localhost|[\w-]+(?:\.[\w-]+)+):\d{2,5}\b"  # host:port
)
_FRAME = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]*\", line \d+")


def public_message(text: str, fallback: str = "The request failed.", limit: int = 1000) -> str:
    """`text` (an exception's or a cluster's words) fit for a client: no class names, no
    addresses, no traceback; `fallback` if nothing is left."""
    if _FRAME.search(text):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else ""
    text = _ADDRESS.sub("(address withheld)", text)
    text = _CLASS_NAME.sub("", text).strip(" :")
    text = encodable(text)[:limit]
    return text or fallback


def internal_error_body() -> dict[str, Any]:
    """The body for an unexpected exception: no detail, no stack trace leaves the gateway."""
    return GatewayError("The gateway hit an internal error. Please retry.").to_body()


# Anthropic's error types by HTTP status (what its SDK maps): the Messages route's errors.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_body(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped error body in Anthropic's shape, `{"type": "error", "error": {"type",
    "message"}}`, for the Messages API's route (its SDK reads that one)."""
    error = body.get("error")
    message = str(error.get("message", "")) if isinstance(error, dict) else ""
    kind = _ANTHROPIC_TYPES.get(status)
    if kind is None:
        kind = "api_error" if status >= 500 else "invalid_request_error"
    return {"type": "error", "error": {"type": kind, "message": message}}


def anthropic_status(kind: Any) -> int | None:
    """The HTTP status an Anthropic error type stands for (None for `api_error`): how an error
    event of a Messages stream becomes the status of a stream that failed before its first
    token."""
    return next((status for status, name in _ANTHROPIC_TYPES.items() if name == kind), None)
