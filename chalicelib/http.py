"""What every control-plane view shares: `route`, which answers any `GatewayError` in OpenAI's
error shape and counts callbacks and refusals (first_core.observability), and the request at
hand (`current_request`, `query`, `raw_body`, `caller`, `base_url`).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from chalice import Blueprint, Response
from chalice.app import Request

from first_core import observability
from first_core.auth import Caller, get_authenticator
from first_core.credentials import one_authorization, source_address
from first_core.dashboard import sessions
from first_core.errors import GatewayError, internal_error_body

log = logging.getLogger("first.control")
_request: contextvars.ContextVar[Request] = contextvars.ContextVar("control_plane_request")


def route(
    blueprint: Blueprint, path: str, **options: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`blueprint.route` whose view answers every `GatewayError` in OpenAI's shape."""
    callback_kind = _callback_kind(path)

    def register(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            request = blueprint.current_request
            assert request is not None, "a view runs inside a request"
            token = _request.set(request)
            try:
                answer = view(*args, **kwargs)
            except GatewayError as error:
                _count_refusal(callback_kind, error)
                return Response(
                    error.to_body(), status_code=error.status, headers=dict(error.headers)
                )
            except Exception:
                log.exception("control-plane route failed", extra={"route": path})
                return Response(internal_error_body(), status_code=500)
            finally:
                _request.reset(token)
            if callback_kind:
                observability.count("Callbacks", Kind=callback_kind, Outcome="accepted")
                elapsed_ms = (time.perf_counter() - started) * 1000
                observability.timing("CallbackMs", elapsed_ms, Kind=callback_kind)
            return answer

        return blueprint.route(path, **options)(guarded)

    return register


def _count_refusal(callback_kind: str | None, error: GatewayError) -> None:
    if callback_kind:
        observability.count("Callbacks", Kind=callback_kind, Outcome=error.status)
    else:
        observability.count("Refused", Status=error.status, Code=error.code)


def _callback_kind(path: str) -> str | None:
    """`result`, `stream` or `batch` for the callback routes the clusters call; else None."""
    if not path.startswith("/callbacks/"):
        return None
    return {"stream": "stream", "batch": "batch"}.get(path.rsplit("/", 1)[-1], "result")


def current_request() -> Request:
    """The request being handled (`route` sets it for the length of the view)."""
    return _request.get()


def query() -> dict[str, str]:
    """The query parameters (empty when there are none)."""
    return dict(current_request().query_params or {})


def raw_body() -> bytes:
    """The body as bytes."""
    body = current_request().raw_body
    return body.encode() if isinstance(body, str) else bytes(body or b"")


def header(name: str) -> str | None:
    """One request header's value (case-insensitive), if any."""
    value = current_request().headers.get(name)
    return None if value is None else str(value)


def authorization() -> str | None:
    """The one Authorization header, if any; 400 if the request has several. API Gateway's
    `headers` keeps only the last of a repeated header: its `multiValueHeaders` has them all
    (under each spelling the client used)."""
    request = current_request()
    repeated = request.to_original_event().get("multiValueHeaders") or {}
    values = [
        str(value)
        for name, values in repeated.items()
        if name.lower() == "authorization"
        for value in values or ()
    ]
    if not values and request.headers.get("authorization") is not None:
        values = [str(request.headers["authorization"])]
    return one_authorization(values)


def client_address() -> str | None:
    """The client's address: the sourceIp API Gateway puts in the request context."""
    return source_address(current_request().context, None)


def caller() -> Caller:
    """Who is calling (401 if that cannot be established), and that they may (403 if not).

    A bearer token, or, with no Authorization header, the dashboard's session cookie; a
    session's request that is not a GET must carry its CSRF header too (403 otherwise)."""
    authenticator = get_authenticator()
    given = authorization()
    session = sessions.read(header("cookie")) if given is None else None
    if session is not None:
        if current_request().method not in ("GET", "HEAD"):
            sessions.check_csrf(session, header(sessions.CSRF_HEADER))
        who = session.caller
    else:
        who = authenticator.authenticate(given, client_address())
    authenticator.authorize(who)
    return who


def base_url() -> str:
    """The base URL the browser used: scheme (API Gateway's `X-Forwarded-Proto`), host, and
    the stage's path prefix (`/dev` on an execute-api address; none locally or on a custom
    domain without a base path)."""
    request = current_request()
    proto = header("x-forwarded-proto") or "http"
    full = str((request.context or {}).get("path") or "")
    path = str(request.to_original_event().get("path") or "")
    prefix = full[: len(full) - len(path)] if path and full.endswith(path) else ""
    return f"{proto}://{header('host') or 'localhost'}{prefix}"


def is_https() -> bool:
    """Whether the browser reached the gateway over https (cookies are then `Secure`)."""
    return base_url().startswith("https://")
