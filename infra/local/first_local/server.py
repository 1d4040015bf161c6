"""One port for every route, as API Gateway gives on AWS: inference POSTs go to the proxy's ASGI
app, everything else to the Chalice app through Chalice's own local gateway (the same Lambda
event conversion `chalice local` uses).
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from chalice.config import Config
from chalice.local import LocalGateway, LocalGatewayException
from starlette.types import Receive, Scope, Send

from first_core.edge import SECURITY_HEADERS
from first_core.errors import NotFoundError

_NOT_FOUND = NotFoundError("Unknown route.", code="unknown_route")
# The Chalice app adds them to its answers (app.edge_guard); these answers are the local gateway's.
_SECURITY_HEADERS = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


class GatewayServer:
    """The gateway on one port (ASGI): inference POSTs to the proxy, the rest to the Chalice app."""

    def __init__(self) -> None:
        from app import app as control_plane
        from functions.proxy.app import app as proxy

        self._proxy = proxy
        self._control_plane = LocalGateway(control_plane, Config())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        from functions.proxy.app import is_inference

        if is_inference(scope["method"], scope["path"]):
            await self._proxy(scope, receive, send)
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
