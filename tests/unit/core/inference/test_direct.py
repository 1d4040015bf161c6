"""The direct path's pieces without a stack: the upstream call as prepared (name, key, usage asked
for), the error mapping, how each streamed event reaches the client, and the one client per loop."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from first_core import ratelimit, schemas
from first_core.errors import (
    ComputeTimeoutError,
    GatewayError,
    InvalidRequestError,
    ServiceUnavailableError,
    UpstreamError,
)
from first_core.inference import direct, upstream
from first_core.registry import DirectBackend, Endpoint, FunctionIds, Limits
from first_local.mock_vllm import MockConfig, create_app
from tests.support.asgi import serve

KEY = "sk-the-providers-key"


def endpoint(**backend: object) -> Endpoint:
    return Endpoint(
        cluster="cloud",
        framework="vllm",
        model="gpt-x",
        endpoint_id="direct:https://api.example.org/v1",
        functions=FunctionIds(inference=""),
        limits=Limits(),
        allowed_groups=[],
        status="online",
        direct=DirectBackend(
            base_url="https://api.example.org/v1",
            upstream_model=str(backend.pop("upstream_model", "provider/gpt-x-2025")),
            **backend,  # type: ignore[arg-type]
        ),
    )


def prepared(
    body: dict[str, object], route: str = "chat/completions", **backend: object
) -> upstream.DirectCall:
    raw = json.dumps(body).encode()
    request = schemas.parse_request(route, raw)  # type: ignore[arg-type]
    return upstream.prepare(
        endpoint(**backend), route, request, raw, ratelimit.Reservation(max_tokens=64)
    )


CHAT = {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}


def test_the_call_carries_the_upstream_name_the_key_and_the_filled_in_max_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLOUD_KEY", KEY)

    call = prepared({**CHAT, "stream": True}, api_key_env="CLOUD_KEY", timeout=7.0)

    sent = json.loads(call.body)
    assert call.url == "https://api.example.org/v1/chat/completions"
    assert sent["model"] == "provider/gpt-x-2025"
    assert sent["max_tokens"] == 64
    assert sent["stream_options"] == {"include_usage": True}  # asked for, for the bill
    assert call.include_usage is False  # ... but the client did not ask
    assert call.headers["authorization"] == f"Bearer {KEY}"
    assert call.timeout == 7.0
    assert KEY not in repr(call)  # the key is never in a log line that prints the call


def test_a_missing_key_is_a_502_naming_neither_key_nor_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CLOUD_KEY", raising=False)

    with pytest.raises(UpstreamError) as missing:
        prepared(CHAT, api_key_env="CLOUD_KEY")

    assert missing.value.status == 502
    assert "CLOUD_KEY" not in missing.value.message


def test_a_non_streamed_call_sends_no_stream_options() -> None:
    call = prepared({**CHAT, "max_tokens": 5})

    sent = json.loads(call.body)
    assert "stream_options" not in sent and sent["max_tokens"] == 64
    assert "authorization" not in call.headers  # no key named: none sent


@pytest.mark.parametrize(
    ("status", "kind", "answered", "code"),
    [
        (401, UpstreamError, 502, "upstream_auth_failed"),
        (403, UpstreamError, 502, "upstream_auth_failed"),
        (400, InvalidRequestError, 400, "backend_rejected"),
        (404, InvalidRequestError, 404, "backend_rejected"),
        (422, InvalidRequestError, 422, "backend_rejected"),
        (429, ServiceUnavailableError, 503, "upstream_busy"),
        (500, UpstreamError, 502, "upstream_error"),
        (503, ServiceUnavailableError, 503, "service_unavailable"),
    ],
)
def test_upstream_errors_map_to_the_gateways(
    status: int,
    kind: type[GatewayError],
    answered: int,
    code: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLOUD_KEY", KEY)
    call = prepared(CHAT, api_key_env="CLOUD_KEY")
    body = json.dumps(
        {"error": {"message": f"bad key {KEY} at http://10.0.0.5:8000/v1 for provider/gpt-x-2025"}}
    ).encode()

    error = direct.upstream_error(status, body, call)

    assert isinstance(error, kind)
    assert (error.status, error.code) == (answered, code)
    assert "10.0.0.5" not in error.message
    assert KEY not in error.message  # an upstream that quotes the key back: withheld
    if status in (400, 404, 422):
        assert "gpt-x" in error.message and "provider/gpt-x-2025" not in error.message
    if answered == 503:
        assert error.headers["Retry-After"]


def test_stream_events_as_the_client_gets_them() -> None:
    plain = prepared({**CHAT, "stream": True})
    asked = prepared({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    chunk = json.dumps(
        {"model": "provider/gpt-x-2025", "choices": [{"delta": {"content": "a"}}], "usage": None}
    )
    usage_chunk = json.dumps(
        {"model": "provider/gpt-x-2025", "choices": [], "usage": {
            "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    )

    event, failed, usage = direct._client_event(None, chunk, plain)
    assert event is not None and not failed and usage is None
    sent = json.loads(event.decode().removeprefix("data: "))
    assert sent["model"] == "gpt-x" and "usage" not in sent  # as OpenAI sends it

    dropped, _, counted = direct._client_event(None, usage_chunk, plain)
    assert dropped is None and counted is not None and counted.total_tokens == 5
    kept, _, _ = direct._client_event(None, usage_chunk, asked)
    assert kept is not None and b'"total_tokens":5' in kept

    error, failed, _ = direct._client_event(
        None, json.dumps({"error": {"message": "boom at http://10.1.1.1:80", "code": 500}}), plain
    )
    assert failed and error is not None and b"10.1.1.1" not in error


def test_one_client_per_event_loop_reused_across_requests() -> None:
    async def twice() -> tuple[object, object]:
        return upstream.client(), upstream.client()

    first, again = asyncio.run(twice())
    other, _ = asyncio.run(twice())

    assert first is again
    assert other is not first


def test_a_timeout_is_the_compute_paths_504() -> None:
    failure = direct._stream_failure(httpx.ReadTimeout("slow"), prepared(CHAT))

    assert failure[0] == "timed_out"
    assert failure[1]["error"]["code"] == ComputeTimeoutError.code


class _Recorded:
    """Stands for the request's end (`direct._Ending`): what the relay ended it with."""

    def __init__(self) -> None:
        self.first_contact: float | None = None
        self.ended: tuple[str, object, object, object] | None = None

    async def write(self, status: str, usage: object, error: object, answer: object) -> None:
        self.ended = (status, usage, error, answer)

    def later(self, status: str, usage: object = None, error: object = None) -> None:
        self.ended = (status, usage, error, None)


def test_a_silent_upstream_gets_keep_alives_then_its_events_and_the_usage_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(direct, "KEEPALIVE_SECONDS", 0.05)
    body = {
        "model": "gpt-x",
        "messages": [{"role": "user", "content": "late [mock:delay=400] [mock:tokens=3]"}],
        "stream": True,
    }
    ended = _Recorded()

    async def relayed(url: str) -> list[bytes]:
        call = prepared(body, upstream_model="gpt-x")
        call = upstream.DirectCall(**{**call.__dict__, "url": f"{url}/v1/chat/completions"})
        response = await direct._send(call, stream=True)
        return [event async for event in direct._relay(response, call, ended)]  # type: ignore[arg-type]

    with serve(create_app(MockConfig(models=("gpt-x",)))) as url:
        events = asyncio.run(relayed(url))

    assert events[0] == b": keep-alive\n\n"  # while the upstream said nothing
    data = [e for e in events if e.startswith(b"data: {")]
    assert len(data) == 4 and events[-1] == b"data: [DONE]\n\n"  # role, 3 tokens; no usage chunk
    assert all(b'"usage"' not in e for e in data)
    assert ended.ended is not None
    status, usage, _, answer = ended.ended
    assert status == "completed"
    assert usage is not None and usage.completion_tokens == 3  # type: ignore[attr-defined]
    assert answer["object"] == "chat.completion"  # type: ignore[index]


def test_a_key_from_secrets_manager_is_read_once_and_a_missing_one_named_nowhere(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    monkeypatch.setattr(upstream, "_secrets", {})
    manager = boto3.client("secretsmanager", region_name="us-east-1")
    manager.create_secret(Name="first/dev/direct/cloud", SecretString=KEY)
    reads = []
    original = boto3.client

    def counted(*args: object, **kwargs: object) -> object:
        reads.append(args)
        return original(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(boto3, "client", counted)

    call = prepared(CHAT, api_key_secret="first/dev/direct/cloud")
    again = prepared(CHAT, api_key_secret="first/dev/direct/cloud")

    assert call.headers["authorization"] == again.headers["authorization"] == f"Bearer {KEY}"
    assert len(reads) == 1  # cached for SECRET_CACHE_SECONDS
    with pytest.raises(UpstreamError) as missing:
        prepared(CHAT, api_key_secret="first/dev/direct/absent")
    assert missing.value.status == 502
    assert "first/dev/direct" not in missing.value.message


def test_a_client_gone_before_the_upstream_call_gets_its_reservation_given_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from first_core.inference.submit import Submission

    settled: list[tuple[object, int]] = []
    monkeypatch.setattr(
        ratelimit, "settle", lambda reservation, used: settled.append((reservation, used))
    )
    call = upstream.DirectCall(
        **{**prepared(CHAT).__dict__, "reservation": {"tokens": 99, "counters": []}}
    )
    request = schemas.parse_request("chat/completions", json.dumps(CHAT).encode())
    submission = Submission("req_x", None, endpoint(), "why", request, 0.0, call)

    async def gone() -> None:
        direct.never_sent(submission)
        await asyncio.sleep(0.2)  # the settle runs on the executor

    asyncio.run(gone())

    assert settled == [({"tokens": 99, "counters": []}, 0)]
