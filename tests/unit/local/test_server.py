"""The local server's stand-in for API Gateway and Lambda Web Adapter (first_local.server): what
the handlers read of the client's address and of a repeated Authorization header, in process."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from first_core.ratelimit import used
from first_core.settings import get_settings
from first_local.server import GatewayServer, _as_lambda_web_adapter

PROXY_ROUTE = "/v1/chat/completions"
CONTROL_ROUTE = "/v1/models"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def send(address: str, method: str, path: str, headers: list[tuple[str, str]]) -> httpx.Response:
    """One request to the whole local gateway, in process, from the TCP peer `address`."""

    async def request() -> httpx.Response:
        transport = httpx.ASGITransport(app=GatewayServer(), client=(address, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            content = BODY if method == "POST" else None
            return await client.request(method, path, headers=headers, content=content)

    return asyncio.run(request())


def window_key(address: str) -> str:
    window = get_settings().auth_failure_window_seconds
    return f"authfail#{address}#{int(time.time() // window) * window}"


@pytest.mark.parametrize(("method", "path"), [("POST", PROXY_ROUTE), ("GET", CONTROL_ROUTE)])
def test_two_authorization_headers_are_a_400_on_the_proxy_and_the_control_plane(
    aws: None, method: str, path: str
) -> None:
    headers = [("Authorization", "Bearer " + "a" * 40), ("Authorization", "Bearer " + "b" * 40)]

    response = send("198.51.100.20", method, path, headers)

    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "duplicate_authorization_header"


@pytest.mark.parametrize(("method", "path"), [("POST", PROXY_ROUTE), ("GET", CONTROL_ROUTE)])
def test_failed_authentications_count_against_the_peer_not_what_the_client_claims(
    aws: None, monkeypatch: pytest.MonkeyPatch, method: str, path: str
) -> None:
    monkeypatch.setattr(get_settings(), "auth_failures_per_address", 2)
    peer = "198.51.100.30" if method == "POST" else "198.51.100.31"
    spoofed = [
        ("Authorization", "Bearer garbage"),
        ("X-Forwarded-For", "192.0.2.99"),
        ("X-Amzn-Request-Context", json.dumps({"identity": {"sourceIp": "192.0.2.98"}})),
    ]

    statuses = [(send(peer, method, path, spoofed)).status_code for _ in range(3)]

    assert statuses == [401, 401, 429]
    assert used(window_key(peer)) == 2
    assert used(window_key("192.0.2.99")) == used(window_key("192.0.2.98")) == 0


def test_the_proxy_gets_the_request_context_as_lambda_web_adapter_sets_it() -> None:
    scope = {
        "type": "http",
        "client": ("198.51.100.40", 5),
        "headers": [(b"x-amzn-request-context", b'{"identity":{"sourceIp":"1.2.3.4"}}')],
    }

    headers = _as_lambda_web_adapter(scope)["headers"]

    contexts = [json.loads(v) for k, v in headers if k == b"x-amzn-request-context"]
    assert contexts == [{"identity": {"sourceIp": "198.51.100.40"}}]
