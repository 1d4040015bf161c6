"""One port for every route, as API Gateway gives on AWS: inference POSTs go to the proxy's ASGI
app, everything else to the Chalice app through Chalice's own local gateway (the same Lambda
event conversion `chalice local` uses).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
from typing import Any

from chalice.config import Config
from chalice.local import EventType, HeaderType, LocalGateway, LocalGatewayException
from starlette.types import Receive, Scope, Send

from first_core.edge import SECURITY_HEADERS
from first_core.errors import NotFoundError

_NOT_FOUND = NotFoundError("Unknown route.", code="unknown_route")
# What API Gateway adds to the event of the request at hand (set in the thread that handles it).
_API_GATEWAY_FIELDS: contextvars.ContextVar[tuple[dict[str, list[str]], str | None]] = (
    contextvars.ContextVar("api_gateway_fields")
)


class _ApiGateway(LocalGateway):
    """Chalice's local gateway, with two fields of the event API Gateway's REST API fills and
    Chalice's own leaves out: every value of a repeated header (`multiValueHeaders`; `headers`
    keeps the last) and the caller's address (`identity.sourceIp`, not a fixed 127.0.0.1)."""

    def _generate_lambda_event(
        self, method: str, path: str, headers: HeaderType, body: bytes | None
    ) -> EventType:
        event = super()._generate_lambda_event(method, path, headers, body)
        repeated, peer = _API_GATEWAY_FIELDS.get(({}, None))
        event["multiValueHeaders"] = repeated
        if peer:
            event["requestContext"]["identity"]["sourceIp"] = peer
        return event


# The Chalice app adds them to its answers (app.edge_guard); these answers are the local gateway's.
_SECURITY_HEADERS = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


class GatewayServer:
    """The gateway on one port (ASGI): inference POSTs to the proxy, the rest to the Chalice app."""

    def __init__(self) -> None:
        from app import app as control_plane
        from functions.proxy.app import app as proxy

        self._proxy = proxy
        self._control_plane = _ApiGateway(control_plane, Config())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        from functions.proxy.app import is_inference

        if is_inference(scope["method"], scope["path"]):
            await self._proxy(_as_lambda_web_adapter(scope), receive, send)
            return
        body = await _read_body(receive)
        status, headers, payload = await asyncio.to_thread(self._call_control_plane, scope, body)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _call_control_plane(self, scope: Scope, body: bytes) -> tuple[int, list[Any], bytes]:
        # Bytes that are not UTF-8 become U+FFFD, as text in API Gateway's JSON event; the
        # control plane refuses such headers itself (first_core.edge), a 400 rather than a 500.
        query = scope["query_string"].decode("utf-8", "replace")
        path = scope["path"] + (f"?{query}" if query else "")
        headers = {
            k.decode("utf-8", "replace").lower(): v.decode("utf-8", "replace")
            for k, v in scope["headers"]
        }
        _API_GATEWAY_FIELDS.set((_repeated_headers(scope), _peer(scope)))
        try:
            response = self._control_plane.handle_request(scope["method"], path, headers, body)
        except LocalGatewayException as error:
            json_headers = [(b"content-type", b"application/json"), *_SECURITY_HEADERS]
            if error.CODE == 403:
                # API Gateway's answer for a route that does not exist ("Missing Authentication
                # Token", or with an Authorization header, a complaint about its SigV4
                # parameters); the template maps it too.
                return 404, json_headers, json.dumps(_NOT_FOUND.to_body()).encode()
            return error.CODE, json_headers, error.body or b""
        raw = response.get("body") or b""
        if response.get("isBase64Encoded"):
            payload = base64.b64decode(raw)
        else:
            payload = raw.encode() if isinstance(raw, str) else raw
        out = [
            (k.lower().encode(), str(v).encode()) for k, v in response.get("headers", {}).items()
        ]
        for k, values in (response.get("multiValueHeaders") or {}).items():
            out += [(k.lower().encode(), str(v).encode()) for v in values]
        return int(response["statusCode"]), out, payload


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _repeated_headers(scope: Scope) -> dict[str, list[str]]:
    """Every header's values, in order, as API Gateway's `multiValueHeaders`."""
    repeated: dict[str, list[str]] = {}
    for name, value in scope["headers"]:
        text = name.decode("utf-8", "replace").lower()
        repeated.setdefault(text, []).append(value.decode("utf-8", "replace"))
    return repeated


def _as_lambda_web_adapter(scope: Scope) -> Scope:
    """The request as the proxy gets it under Lambda Web Adapter: with the request context in
    `x-amzn-request-context` (here just the caller's address), replacing any the client sent."""
    context = json.dumps({"identity": {"sourceIp": _peer(scope)}}).encode()
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"x-amzn-request-context"]
    return {**scope, "headers": [*headers, (b"x-amzn-request-context", context)]}


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
