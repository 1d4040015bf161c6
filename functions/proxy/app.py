"""The inference proxy: an ASGI app for the OpenAI inference routes.

On AWS it runs under Lambda Web Adapter with response streaming (handler `run.sh`); locally the
`first-gateway dev` server mounts it beside the Chalice app on one port. It only adapts HTTP to
`first_core.inference`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from first_core import inference, observability
from first_core.auth import get_authenticator
from first_core.credentials import one_authorization, source_address
from first_core.errors import GatewayError, NotFoundError, internal_error_body

log = logging.getLogger("first.proxy")
observability.configure_logging()

# The inference routes, shared with the local server and the template's API routing.
FEDERATED_PREFIX = "/v1/"
CLUSTER_PREFIX = "/resource_server/v1/{cluster}/{framework}/v1/"
INFERENCE_PATH = re.compile(
    r"^/(?:v1|resource_server/v1/[^/]+/[^/]+/v1)/(?:chat/completions|completions|embeddings)/?$"
)


def is_inference(method: str, path: str) -> bool:
    """Whether API Gateway sends this request to the proxy rather than the Chalice app."""
    return method == "POST" and INFERENCE_PATH.match(path) is not None


async def infer(request: Request) -> Response:
    """The inference route: one request answered (or refused), with its metrics."""
    started = time.perf_counter()
    response = await _infer(request)
    # One line of metrics per request: how it ended and how long the gateway took to answer
    # (for a stream, to send its headers).
    route = request.path_params.get("openai_path", "?")
    status = response.status_code
    outcome = "ok" if status < 400 else "refused" if status < 500 else "error"
    observability.count("Requests", Route=route, Outcome=outcome)
    observability.timing("RequestMs", (time.perf_counter() - started) * 1000, Route=route)
    return response


async def _infer(request: Request) -> Response:
    try:
        openai_path = request.path_params["openai_path"]
        if openai_path not in inference.INFERENCE_PATHS:
            raise NotFoundError(f"Unknown route POST {request.url.path}.")
        started = time.perf_counter()
        authenticator = get_authenticator()
        caller = await asyncio.to_thread(authenticator.authenticate, *credentials(request))
        authenticator.authorize(caller)
        body = await request.body()
        answer = await inference.answer(
            caller,
            openai_path,
            body,
            request.path_params.get("cluster"),
            request.path_params.get("framework"),
            auth_ms=(time.perf_counter() - started) * 1000,
        )
        if answer.events is not None:
            return StreamingResponse(
                answer.events, media_type="text/event-stream", headers=answer.headers
            )
        return JSONResponse(answer.body, headers=answer.headers)
    except GatewayError as error:
        return error_response(error)
    except Exception:
        log.exception("inference request failed")
        return JSONResponse(internal_error_body(), status_code=500)


def credentials(request: Request) -> tuple[str | None, str | None]:
    """The request's one Authorization header (400 if several) and the client's address: API
    Gateway's sourceIp in Lambda Web Adapter's `x-amzn-request-context`, else the TCP peer
    (first_core.credentials)."""
    authorization = one_authorization(request.headers.getlist("authorization"))
    peer = request.client.host if request.client else None
    return authorization, source_address(request.headers.get("x-amzn-request-context"), peer)


def error_response(error: GatewayError) -> JSONResponse:
    """A refusal as OpenAI's error body and status, counted."""
    observability.count("Refused", Status=error.status, Code=error.code or error.type)
    return JSONResponse(error.to_body(), status_code=error.status, headers=error.headers)


app = Starlette(
    routes=[
        Route(FEDERATED_PREFIX + "{openai_path:path}", infer, methods=["POST"]),
        Route(CLUSTER_PREFIX + "{openai_path:path}", infer, methods=["POST"]),
    ]
)
