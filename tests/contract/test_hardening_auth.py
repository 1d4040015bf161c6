"""Cheap refusals (issue 15, items 2, 3 and 7), tried as an attacker would against the real local
stack: floods of malformed and made-up tokens, the failed-authentication limit per address, two
Authorization headers, and a Globus Auth that hangs.

Each test sends from an address of its own on the loopback network (127.x.y.z, bound with
httpx's `local_address`), which the gateway counts by its TCP peer as it counts API Gateway's
sourceIp on AWS: the failures a test provokes leave the other tests' address (127.0.0.1) alone.
"""

from __future__ import annotations

import json
import random
import secrets
import string
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from first_core.settings import Settings
from first_local.globus_standin import mint_token
from tests.contract.conftest import Stack

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
CHAT = "/v1/chat/completions"
CHAT_ON_A_CLUSTER = "/resource_server/v1/sophia/vllm/v1/chat/completions"
MODELS = "/v1/models"
WHOAMI = "/resource_server/v1/whoami"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
# The stack runs with the default settings for these.
LIMIT = Settings.model_fields["auth_failures_per_address"].default
WINDOW = Settings.model_fields["auth_failure_window_seconds"].default


def own_address() -> str:
    """A loopback address no other test sends from."""
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


@pytest.fixture
def attacker(stack: Stack) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(local_address=own_address())
    with httpx.Client(base_url=stack.base_url, transport=transport, timeout=60) as client:
        yield client


def introspections(stack: Stack) -> int:
    return int(stack.standin_calls().get("introspect", 0))


def send(client: httpx.Client, path: str, authorization: str | None) -> httpx.Response:
    headers = {} if authorization is None else {"Authorization": authorization}
    if path in (MODELS, WHOAMI):
        return client.get(path, headers=headers)
    return client.post(path, json=BODY, headers=headers)


def assert_openai_error(response: httpx.Response, status: int | set[int]) -> dict[str, Any]:
    wanted = {status} if isinstance(status, int) else status
    assert response.status_code in wanted, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def well_formed_garbage() -> str:
    """A token of a Globus access token's shape that nobody issued."""
    return "Ag" + "".join(random.choices(string.ascii_letters + string.digits, k=70))


def malformed_tokens(count: int) -> list[str]:
    """Authorization values that present a bearer token of the wrong shape (printable ASCII)."""
    printable = string.ascii_letters + string.digits + string.punctuation
    makers = [
        lambda: "Bearer " + "".join(random.choices(string.ascii_letters, k=random.randint(1, 19))),
        lambda: "Bearer " + "A" * random.randint(2049, 6000),
        lambda: "Bearer " + "".join(random.choices(printable + " ", k=60)).strip() + ' "x',
        lambda: "Bearer " + secrets.token_hex(20) + "<script>",
        lambda: "Bearer " + secrets.token_hex(20) + ";" + secrets.token_hex(4),
        lambda: "Bearer =" + secrets.token_urlsafe(40),
        lambda: "Bearer " + secrets.token_hex(16) + " " + secrets.token_hex(16),
        lambda: "Bearer",
    ]
    return [random.choice(makers)() for _ in range(count)]


def test_300_malformed_tokens_cost_no_call_to_globus(stack: Stack, attacker: httpx.Client) -> None:
    before = introspections(stack)
    statuses = []
    for i, authorization in enumerate(malformed_tokens(300)):
        response = send(attacker, (CHAT, MODELS, CHAT_ON_A_CLUSTER)[i % 3], authorization)
        error = assert_openai_error(response, {401, 429})
        statuses.append(response.status_code)
        if response.status_code == 401:
            assert error["type"] == "authentication_error"

    assert introspections(stack) == before  # not one introspection
    # Malformed tokens count as failed authentications: past the limit, 429.
    assert statuses[:LIMIT] == [401] * LIMIT
    assert set(statuses[LIMIT:]) == {429}


def test_made_up_tokens_reach_globus_at_most_once_each(
    stack: Stack, attacker: httpx.Client
) -> None:
    tokens = [well_formed_garbage() for _ in range(25)]
    before = introspections(stack)
    for path in (CHAT, MODELS, CHAT_ON_A_CLUSTER):
        for token in tokens:
            error = assert_openai_error(send(attacker, path, f"Bearer {token}"), 401)
            assert error["type"] == "authentication_error"

    # Three tries of each (75 refusals, under the limit): Globus saw each token once, then
    # the refusal came from the gateway's memory.
    assert introspections(stack) - before == len(tokens)


def test_past_the_failure_limit_an_address_gets_429_without_globus_but_a_cached_token_works(
    stack: Stack, attacker: httpx.Client
) -> None:
    valid = mint_token("dave")
    assert send(attacker, WHOAMI, f"Bearer {valid}").status_code == 200  # now cached
    for _ in range(LIMIT):
        assert_openai_error(send(attacker, MODELS, "Bearer not-a-token"), 401)
    before = introspections(stack)

    for path in (CHAT, MODELS):
        limited = send(attacker, path, f"Bearer {well_formed_garbage()}")
        error = assert_openai_error(limited, 429)
        assert error["type"] == "rate_limit_error"
        assert error["code"] == "too_many_failed_authentications"
        assert 1 <= int(limited.headers["retry-after"]) <= WINDOW
    # A valid token this instance has not seen is not cached: it waits too.
    assert_openai_error(send(attacker, WHOAMI, f"Bearer {mint_token('dave')}"), 429)
    assert introspections(stack) == before  # Globus was asked nothing

    # The cached valid token still works from the same address, on both planes.
    assert send(attacker, WHOAMI, f"Bearer {valid}").status_code == 200
    answered = send(attacker, CHAT, f"Bearer {valid}")
    assert answered.status_code == 200, answered.text[:300]
    # Another address is not affected.
    other = httpx.HTTPTransport(local_address=own_address())
    with httpx.Client(base_url=stack.base_url, transport=other, timeout=60) as elsewhere:
        assert send(elsewhere, WHOAMI, f"Bearer {mint_token('dave')}").status_code == 200


@pytest.mark.parametrize("path", [CHAT, CHAT_ON_A_CLUSTER, MODELS, WHOAMI])
def test_two_authorization_headers_are_a_400_on_every_plane(
    stack: Stack, attacker: httpx.Client, path: str
) -> None:
    mine, someone_elses = mint_token("dave"), "Ag" + secrets.token_hex(30)
    for pair in ((mine, someone_elses), (someone_elses, mine), (mine, mine)):
        headers = [("Authorization", f"Bearer {pair[0]}"), ("Authorization", f"Bearer {pair[1]}")]
        if path in (MODELS, WHOAMI):
            response = attacker.get(path, headers=headers)
        else:
            response = attacker.post(path, json=BODY, headers=headers)

        error = assert_openai_error(response, 400)
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "duplicate_authorization_header"


def set_hang(stack: Stack, seconds: float) -> dict[str, Any]:
    base = stack.state["globus_auth_url"].rstrip("/").removesuffix("/auth")
    request = urllib.request.Request(f"{base}/_standin/hang?seconds={seconds}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return dict(json.load(response))


def test_a_globus_auth_that_hangs_is_a_503_within_seconds(
    stack: Stack, attacker: httpx.Client
) -> None:
    cached = mint_token("dave")
    assert send(attacker, WHOAMI, f"Bearer {cached}").status_code == 200
    fresh = mint_token("dave")
    set_hang(stack, 120)
    try:
        for path in (MODELS, CHAT):
            started = time.monotonic()
            response = send(attacker, path, f"Bearer {mint_token('dave')}")
            elapsed = time.monotonic() - started
            error = assert_openai_error(response, 503)
            assert "Globus" in error["message"] and "retry" in error["message"]
            assert int(response.headers["retry-after"]) >= 1
            assert elapsed < 10, elapsed  # the read timeout (5 s), not minutes
        # A token the gateway has already checked does not wait for Globus at all.
        started = time.monotonic()
        assert send(attacker, WHOAMI, f"Bearer {cached}").status_code == 200
        assert time.monotonic() - started < 2
        assert_openai_error(send(attacker, WHOAMI, f"Bearer {fresh}"), 503)
    finally:
        assert set_hang(stack, 0) == {"hang_seconds": 0}

    # The outage was not remembered as a refusal: the same token works once Globus answers.
    assert send(attacker, WHOAMI, f"Bearer {fresh}").status_code == 200
