"""The inference proxy: an ASGI app for the OpenAI inference routes.

On AWS it runs under Lambda Web Adapter with response streaming (handler `run.sh`); locally the
`first-gateway dev` server mounts it beside the Chalice app on one port. It only adapts HTTP to
`first_core.inference`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, Coroutine
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from first_core import edge, inference, observability
from first_core.auth import get_authenticator
from first_core.credentials import authorization_or_api_key, one_authorization, source_address
from first_core.errors import GatewayError, NotFoundError, anthropic_body, internal_error_body
from first_core.idempotency import check_key

log = logging.getLogger("first.proxy")
observability.configure_logging()
T = TypeVar("T")

# The inference routes, shared with the local server and the template's API routing.
FEDERATED_PREFIX = "/v1/"
CLUSTER_PREFIX = "/resource_server/v1/{cluster}/{framework}/v1/"
INFERENCE_PATH = re.compile(
    r"^/(?:v1|resource_server/v1/[^/]+/[^/]+/v1)/(?:chat/completions|completions|embeddings|responses|messages)/?$"
)
# nginx's "client closed request": what the logs show for a client that left before its answer
# (nobody receives it).
CLIENT_CLOSED = 499
# Anthropic's Messages API: its SDK may send the token as `x-api-key`, and reads its errors in
# Anthropic's shape (first_core.errors.anthropic_body).
MESSAGES = "messages"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def is_inference(method: str, path: str) -> bool:
    """Whether API Gateway sends this request to the proxy rather than the Chalice app."""
    return method == "POST" and INFERENCE_PATH.match(path) is not None


async def infer(request: Request) -> Response:
    """The inference route: one request answered (or refused), with its metrics."""
    started = time.perf_counter()
    response = await _infer(request)
    # One line of metrics per request: how it ended and how long the gateway took to answer
    # (for a stream, to send its headers; its outcome is counted when it ends, `_counted`).
    route = request.path_params.get("openai_path", "?")
    observability.timing("RequestMs", (time.perf_counter() - started) * 1000, Route=route)
    if not isinstance(response, StreamingResponse):
        observability.count("Requests", Route=route, Outcome=_outcome(response.status_code))
    return response


def _outcome(status: int) -> str:
    if status == CLIENT_CLOSED:
        return "cancelled"
    return "ok" if status < 400 else "refused" if status < 500 else "error"


async def _infer(request: Request) -> Response:
    openai_path = request.path_params["openai_path"]
    response = await _answer(request, openai_path)
    if openai_path.strip("/") == MESSAGES and isinstance(response, JSONResponse):
        return _in_anthropic_shape(response)
    return response


async def _answer(request: Request, openai_path: str) -> Response:
    try:
        if openai_path not in inference.INFERENCE_PATHS:
            raise NotFoundError(f"Unknown route POST {request.url.path}.")
        started = time.perf_counter()
        authenticator = get_authenticator()
        caller = await asyncio.to_thread(authenticator.authenticate, *credentials(request))
        authenticator.authorize(caller)
        body = await request.body()
        answering = inference.answer(
            caller,
            openai_path,
            body,
            request.path_params.get("cluster"),
            request.path_params.get("framework"),
            auth_ms=(time.perf_counter() - started) * 1000,
            idempotency_key=check_key(request.headers.get("idempotency-key")),
        )
        answer = await _unless_client_leaves(request, answering)
        if answer.events is not None:
            request_id = answer.headers.get("x-first-request-id", "")
            events = _counted(answer.events, openai_path, request_id)
            return StreamingResponse(events, media_type="text/event-stream", headers=answer.headers)
        return JSONResponse(answer.body, headers=answer.headers)
    except GatewayError as error:
        return error_response(error)
    except (ClientGone, ClientDisconnect):  # ClientDisconnect: gone while sending its body
        return Response(status_code=CLIENT_CLOSED)
    except Exception:
        log.exception("inference request failed")
        return JSONResponse(internal_error_body(), status_code=500)


def credentials(request: Request) -> tuple[str | None, str | None]:
    """The request's one Authorization header (400 if several; on the Messages route, else its
    one `x-api-key` as a bearer token) and the client's address: API Gateway's sourceIp in
    Lambda Web Adapter's `x-amzn-request-context`, else the TCP peer (first_core.credentials)."""
    authorization = one_authorization(request.headers.getlist("authorization"))
    if request.path_params.get("openai_path", "").strip("/") == MESSAGES:
        api_keys = request.headers.getlist("x-api-key")
        authorization = authorization_or_api_key(authorization, api_keys)
    peer = request.client.host if request.client else None
    return authorization, source_address(request.headers.get("x-amzn-request-context"), peer)


async def _unless_client_leaves(request: Request, answering: Coroutine[Any, Any, T]) -> T:
    """`answering`'s result, unless the client disconnects first: then it is cancelled (the
    core ends the request `cancelled`, as when a stream's client leaves) and `ClientGone`."""
    work = asyncio.ensure_future(answering)
    # The body has been read, so the next message is the disconnect. Listening stops once the
    # answer is ready: a stream's response listens for itself.
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        gone.cancel()
    if work.done():
        return work.result()
    work.cancel()  # the core logs it, with the request id
    with contextlib.suppress(asyncio.CancelledError):
        await work
    raise ClientGone


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _counted(
    events: AsyncGenerator[bytes, None], route: str, request_id: str
) -> AsyncGenerator[bytes, None]:
    """A stream's events, counted in `Requests` when it ends: `ok`, or `cancelled` if the client
    left first (the relay then cancels the request)."""
    outcome = "cancelled"
    try:
        async for event in events:
            yield event
        outcome = "ok"
    finally:
        if outcome == "cancelled":
            log.info(
                "client disconnected mid-stream: request cancelled",
                extra={"request_id": request_id},
            )
        observability.count("Requests", Route=route, Outcome=outcome)


def _in_anthropic_shape(response: JSONResponse) -> Response:
    """An error answer of the Messages route, in Anthropic's shape, with the same status and
    headers (the one place the Messages route's errors are converted)."""
    if response.status_code < 400:
        return response
    try:
        body = json.loads(bytes(response.body))
    except ValueError:
        return response
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return response
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return JSONResponse(
        anthropic_body(response.status_code, body), response.status_code, headers=headers
    )


def error_response(error: GatewayError) -> JSONResponse:
    """A refusal as OpenAI's error body and status, counted."""
    observability.count("Refused", Status=error.status, Code=error.code or error.type)
    return JSONResponse(error.to_body(), status_code=error.status, headers=error.headers)


class EdgeGuard:
    """Around the whole app (pure ASGI, so streams are not buffered): a header that is not
    UTF-8 text is a 400 before anything reads it, and every answer carries
    `first_core.edge.SECURITY_HEADERS` (every route here takes a token)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        secured = _with_security_headers(send)
        try:
            edge.check_headers(scope["headers"])
        except GatewayError as error:
            await error_response(error)(scope, receive, secured)
            return
        await self.app(scope, receive, secured)


_SECURITY_HEADERS = [(k.encode(), v.encode()) for k, v in edge.SECURITY_HEADERS.items()]


def _with_security_headers(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            names = {name for name, _ in _SECURITY_HEADERS}
            kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
            message = {**message, "headers": kept + _SECURITY_HEADERS}
        await send(message)

    return sending


app = EdgeGuard(
    Starlette(
        routes=[
            Route(FEDERATED_PREFIX + "{openai_path:path}", infer, methods=["POST"]),
            Route(CLUSTER_PREFIX + "{openai_path:path}", infer, methods=["POST"]),
        ]
    )
)
