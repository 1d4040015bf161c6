"""A direct backend's upstream call, made ready before anything is sent: the request as the
upstream takes it, its key, and the one HTTP client per event loop (first_core.inference.direct
makes the call).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import httpx

from first_core import ratelimit
from first_core.errors import UpstreamError
from first_core.registry import DirectBackend, Endpoint
from first_core.schemas import RequestBody
from first_core.schemas.apis import MessagesRequest, ResponsesRequest
from first_core.settings import get_settings

log = logging.getLogger("first.direct")

# Connecting to an upstream never waits longer than this, whatever its timeout.
CONNECT_SECONDS = 10.0
# A key from Secrets Manager is read again after this long (a rotated key is picked up).
SECRET_CACHE_SECONDS = 300.0


@dataclass(frozen=True)
class DirectCall:
    """One upstream call, ready to make: where, with what, how long to wait, and what the client
    asked for that the gateway changes on the way (the model's name, the usage chunk)."""

    url: str
    openai_path: str
    body: bytes
    headers: dict[str, str] = field(repr=False)  # holds the key: never logged
    timeout: float
    gateway_model: str
    upstream_model: str
    stream: bool
    include_usage: bool  # the client asked for the stream's usage chunk
    named: str | None  # "responses" / "messages": named-event streams
    reservation: dict[str, Any] | None
    created_at: float


_secrets: dict[str, tuple[float, str]] = {}
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def api_key(backend: DirectBackend) -> str | None:
    """The upstream's key: an environment variable (local), a Secrets Manager secret (AWS; read
    once per `SECRET_CACHE_SECONDS`), or none. A key that cannot be had is a 502 that names
    neither the key nor where it lives (the log says which)."""
    if backend.api_key_env:
        value = os.environ.get(backend.api_key_env)
        if not value:
            log.error("direct backend %s: its key variable is not set", backend.base_url)
            raise UpstreamError(_NO_KEY, code="upstream_key_missing")
        return value
    if backend.api_key_secret:
        return _secret(backend.api_key_secret, backend.base_url)
    return None


_NO_KEY = "The gateway has no working credentials for this model's backend; tell its operator."


def _secret(name: str, base_url: str) -> str:
    cached = _secrets.get(name)
    now = time.monotonic()
    if cached is not None and cached[0] > now:
        return cached[1]
    import boto3

    s = get_settings()
    try:
        manager = boto3.client(
            "secretsmanager", region_name=s.aws_region, endpoint_url=s.aws_endpoint_url
        )
        value = str(manager.get_secret_value(SecretId=name)["SecretString"]).strip()
    except Exception:
        log.exception("direct backend %s: its key secret could not be read", base_url)
        raise UpstreamError(_NO_KEY, code="upstream_key_missing") from None
    _secrets[name] = (now + SECRET_CACHE_SECONDS, value)
    return value


def client() -> httpx.AsyncClient:
    """The event loop's client: its connections to the upstreams stay open between requests
    (and between the invocations of a warm Lambda, whose loop lives on)."""
    loop = asyncio.get_running_loop()
    found = _clients.get(loop)
    if found is None or found.is_closed:
        found = _clients[loop] = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            follow_redirects=False,
        )
    return found


def prepare(
    endpoint: Endpoint,
    openai_path: str,
    request: RequestBody,
    raw_body: bytes,
    reservation: ratelimit.Reservation,
) -> DirectCall:
    """The upstream call for an accepted request (its rate limits reserved)."""
    backend = endpoint.direct
    assert backend is not None
    payload: dict[str, Any] = json.loads(raw_body)
    payload["model"] = backend.upstream_model
    if reservation.max_tokens is not None:
        payload[request.max_tokens_key] = reservation.max_tokens
    stream = request.wants_stream()
    named = _named(request)
    options = payload.get("stream_options")
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    if not stream:
        payload.pop("stream_options", None)  # nothing streams; vLLM would refuse the key
    elif named is None:
        # Usage is always asked for, so the stream can be billed; the client sees the usage
        # chunk only if it asked.
        payload["stream_options"] = {**(options or {}), "include_usage": True}
    headers = {"content-type": "application/json", "accept": "application/json"}
    if stream:
        headers["accept"] = "text/event-stream"
    key = api_key(backend)
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    timeout = backend.timeout or get_settings().result_wait_seconds
    return DirectCall(
        url=f"{backend.base_url}/{openai_path}",
        openai_path=openai_path,
        body=json.dumps(payload, separators=(",", ":")).encode(),
        headers=headers,
        timeout=timeout,
        gateway_model=endpoint.model,
        upstream_model=backend.upstream_model,
        stream=stream,
        include_usage=include_usage,
        named=named,
        reservation=reservation.to_json() if reservation.counters else None,
        created_at=time.time(),
    )


def _named(request: RequestBody) -> str | None:
    if isinstance(request, ResponsesRequest):
        return "responses"
    return "messages" if isinstance(request, MessagesRequest) else None


def timeout(call: DirectCall) -> httpx.Timeout:
    """The endpoint's timeout bounds each wait on the upstream (for its answer, for the next
    part of a stream), not a stream's whole length."""
    return httpx.Timeout(call.timeout, connect=min(call.timeout, CONNECT_SECONDS))
