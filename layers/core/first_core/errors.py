"""The one error hierarchy of the gateway, and its one mapping to HTTP.

Every refusal the gateway makes is a `GatewayError`. Handlers never build error bodies
themselves: they catch `GatewayError` and call `to_response_body()`; the status and the
OpenAI `type` come from the class, so the OpenAI SDK raises the matching exception
(`AuthenticationError` for 401, `PermissionDeniedError` for 403, ...).
"""

from __future__ import annotations

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
        self.message = message
        self.param = param
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


class ComputeTimeoutError(GatewayError):
    """The synchronous wait for a result ran out; the request id lets the client come back."""

    status = 504
    type = "timeout_error"
    code = "compute_timeout"


def internal_error_body() -> dict[str, Any]:
    """The body for an unexpected exception: no detail, no stack trace leaves the gateway."""
    return GatewayError("The gateway hit an internal error. Please retry.").to_body()
