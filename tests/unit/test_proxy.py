"""The inference proxy's edge, in process: a client that leaves, header bytes, and the headers
every answer carries (the contract tests do the same against the running stack)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import functions.proxy.app as proxy
from first_core.inference.answer import Answer

Message = dict[str, Any]


class Caller:
    user_id = "u"


class Authenticator:
    def authenticate(self, authorization: str | None, address: str | None = None) -> Caller:
        return Caller()

    def authorize(self, caller: Caller) -> None:
        return None


def scope(headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": headers or [(b"authorization", b"Bearer t")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


async def call(
    messages: list[Message], headers: list[tuple[bytes, bytes]] | None = None
) -> list[Message]:
    """Run the proxy app; `messages` are what the client sends, then it waits forever."""
    incoming = list(messages)
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # the client says nothing more
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    await asyncio.wait_for(proxy.app(scope(headers), receive, send), timeout=10)
    return sent


@pytest.fixture(autouse=True)
def _no_globus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "get_authenticator", Authenticator)


def headers_of(sent: list[Message]) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {}
    for name, value in sent[0]["headers"]:
        found.setdefault(name, []).append(value)
    return found


def test_a_client_that_leaves_while_waiting_cancels_its_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cancelled = asyncio.Event()
    counted: list[dict[str, str]] = []

    async def never_answers(*args: Any, **kwargs: Any) -> Answer:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    monkeypatch.setattr(proxy.inference, "answer", never_answers)
    monkeypatch.setattr(
        proxy.observability, "count", lambda name, **dims: counted.append({"name": name, **dims})
    )
    body = {"type": "http.request", "body": b"{}", "more_body": False}
    sent = asyncio.run(call([body, {"type": "http.disconnect"}]))
    assert cancelled.is_set()
    assert sent[0]["status"] == proxy.CLIENT_CLOSED
    assert {"name": "Requests", "Route": "chat/completions", "Outcome": "cancelled"} in counted


def test_a_client_that_leaves_while_sending_its_body_is_not_a_500(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def not_called(*args: Any, **kwargs: Any) -> Answer:
        raise AssertionError("no answer without a body")

    monkeypatch.setattr(proxy.inference, "answer", not_called)
    partial = {"type": "http.request", "body": b"{", "more_body": True}
    sent = asyncio.run(call([partial, {"type": "http.disconnect"}]))
    assert sent[0]["status"] == proxy.CLIENT_CLOSED


def test_an_answer_in_time_is_sent_with_the_security_headers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def answers(*args: Any, **kwargs: Any) -> Answer:
        return Answer({"x-first-request-id": "req_1", "cache-control": "public"}, body={"ok": 1})

    monkeypatch.setattr(proxy.inference, "answer", answers)
    sent = asyncio.run(call([{"type": "http.request", "body": b"{}", "more_body": False}]))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b'{"ok":1}'
    found = headers_of(sent)
    assert found[b"cache-control"] == [b"no-store"]  # replaces whatever the answer said
    assert found[b"x-content-type-options"] == [b"nosniff"]


def test_a_header_that_is_not_utf8_is_refused_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def not_called(*args: Any, **kwargs: Any) -> Answer:
        raise AssertionError("refused first")

    monkeypatch.setattr(proxy.inference, "answer", not_called)
    sent = asyncio.run(
        call(
            [{"type": "http.request", "body": b"{}", "more_body": False}],
            headers=[(b"authorization", b"Bearer \xff")],
        )
    )
    assert sent[0]["status"] == 400
    assert b'"code":"invalid_header"' in sent[1]["body"]
    assert headers_of(sent)[b"x-content-type-options"] == [b"nosniff"]
