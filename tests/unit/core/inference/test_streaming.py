"""The stream callback and the relay, on pynamodb against in-process moto."""

# ruff: noqa: E402 (the environment is set before first_core reads its settings)

from __future__ import annotations

import os

for _name, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "FIRST_CALLBACK_SECRET": "stream-test-secret",
}.items():
    os.environ.setdefault(_name, _value)

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from compute_funcs.streaming import vllm_streaming
from first_core.callbacks import callback_token
from first_core.errors import (
    AuthenticationError,
    ConflictError,
    GatewayError,
    InvalidRequestError,
    PayloadTooLargeError,
)
from first_core.inference import records, relay, stream_sink
from first_core.settings import get_settings
from first_core.tables import RequestRecord, StreamChunkBatch
from first_local.mock_vllm import MockConfig, count_prompt_tokens, create_app, generate_text
from first_local.provision import TEMPLATE, create_tables_from_template
from tests.support.asgi import serve

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


@pytest.fixture(scope="module", autouse=True)
def _stream_tables() -> Iterator[None]:
    with mock_aws():
        settings = get_settings()
        dynamodb = boto3.client("dynamodb", region_name=settings.aws_region)
        create_tables_from_template(dynamodb, TEMPLATE, settings.table_prefix)
        yield


def new_request(status: str = "submitted") -> str:
    request_id = f"req_{uuid.uuid4().hex}"
    now = time.time()
    RequestRecord(
        request_id, user_id="u1", username="alice", model="m", cluster="c", framework="vllm",
        endpoint_id="e", openai_path="chat/completions", stream=True, status=status,
        open_status=None if status != "submitted" else "open", created_at=now, updated_at=now,
    ).save()
    return request_id


def chunk(content: str | None, *, finish: str | None = None) -> str:
    """A vLLM chat chunk as it comes when include_usage was asked for (`"usage": null`)."""
    delta = {"role": "assistant", "content": ""} if content is None else {"content": content}
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                       "model": "m", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish}], "usage": None},
                      separators=(",", ":"))


USAGE_CHUNK = json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                          "model": "m", "choices": [], "usage": USAGE}, separators=(",", ":"))


def post(request_id: str, seq: int, chunks: list[str], *, done: bool = False,
         error: dict[str, Any] | None = None, usage: dict[str, Any] | None = None,
         token_for: str | None = None) -> dict[str, Any]:
    body = {"request_id": request_id, "seq": seq, "chunks": chunks, "done": done,
            "error": error, "usage": usage}
    token = callback_token(token_for or request_id)
    return stream_sink.accept_stream_callback(request_id, f"Bearer {token}",
                                            json.dumps(body).encode())


def rows(request_id: str) -> list[StreamChunkBatch]:
    return list(StreamChunkBatch.query(request_id, consistent_read=True))


def record(request_id: str) -> RequestRecord:
    return RequestRecord.get(request_id, consistent_read=True)


async def collect(events: AsyncIterator[bytes]) -> list[bytes]:
    return [event async for event in events]


def relay_all(request_id: str, *, include_usage: bool = False, timeout: float = 5.0,
              keepalive: float = 15.0) -> list[bytes]:
    return asyncio.run(collect(relay.relay(
        request_id, include_usage=include_usage, deadline=time.monotonic() + timeout,
        keepalive_seconds=keepalive)))


def data(event: bytes) -> Any:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    text = event[6:-2].decode()
    return text if text == "[DONE]" else json.loads(text)


# ---- the callback ------------------------------------------------------------------------------


def test_duplicate_batch_is_a_no_op() -> None:
    request_id = new_request()
    assert post(request_id, 0, [chunk(None)]) == {"continue": True, "duplicate": False}
    assert post(request_id, 0, [chunk("other")]) == {"continue": True, "duplicate": True}
    (row,) = rows(request_id)
    assert row.chunks == [chunk(None)]


def test_done_batch_completes_the_request_once() -> None:
    request_id = new_request()
    post(request_id, 0, [chunk("Hi", finish="stop"), USAGE_CHUNK], done=True, usage=USAGE)
    stored = record(request_id)
    assert stored.status == "completed" and stored.open_status is None
    assert (stored.prompt_tokens, stored.completion_tokens, stored.total_tokens) == (5, 3, 8)
    # The same final batch again (its reply was lost) is a duplicate, not a conflict.
    again = post(request_id, 0, [chunk("Hi", finish="stop"), USAGE_CHUNK], done=True, usage=USAGE)
    assert again == {"continue": True, "duplicate": True}


@pytest.mark.parametrize("who", ["wrong", "other-request", "missing"])
def test_bad_token_writes_nothing(who: str) -> None:
    request_id = new_request()
    body = json.dumps({"request_id": request_id, "seq": 0, "chunks": [chunk("x")]}).encode()
    authorization = {
        "wrong": "Bearer not-a-token",
        "other-request": f"Bearer {callback_token(new_request())}",
        "missing": None,
    }[who]
    with pytest.raises(AuthenticationError):
        stream_sink.accept_stream_callback(request_id, authorization, body)
    assert rows(request_id) == []


def test_malformed_or_oversized_batches_are_refused() -> None:
    request_id = new_request()
    token = f"Bearer {callback_token(request_id)}"
    with pytest.raises(InvalidRequestError):
        stream_sink.accept_stream_callback(request_id, token, b'{"request_id": 1}')
    with pytest.raises(InvalidRequestError):
        other = json.dumps({"request_id": "req_other", "seq": 0}).encode()
        stream_sink.accept_stream_callback(request_id, token, other)
    with pytest.raises(PayloadTooLargeError):
        stream_sink.accept_stream_callback(request_id, token, b" " * 400_000)
    assert rows(request_id) == []


def test_cancelled_request_stops_the_stream_and_bills_what_was_generated() -> None:
    request_id = new_request()
    post(request_id, 0, [chunk(None)])
    stream_sink.cancel(request_id)
    assert post(request_id, 1, [chunk("late")]) == {"continue": False, "duplicate": False}
    assert [int(r.seq) for r in rows(request_id)] == [0]
    # The compute function's last word: the usage of what it generated, after the cancel.
    generated = {"prompt_tokens": 0, "completion_tokens": 2, "total_tokens": 2}
    assert post(request_id, 2, [], done=True, usage=generated)["continue"] is False
    post(request_id, 3, [], done=True, usage=USAGE)  # a second report does not overwrite
    stored = record(request_id)
    assert stored.status == "cancelled"
    assert (stored.prompt_tokens, stored.completion_tokens, stored.total_tokens) == (0, 2, 2)
    assert [int(r.seq) for r in rows(request_id)] == [0]


def test_batch_for_an_ended_request_is_a_conflict() -> None:
    request_id = new_request("completed")
    with pytest.raises(ConflictError):
        post(request_id, 0, [chunk("x")])
    with pytest.raises(ConflictError):
        post(request_id, 0, [], done=True, error={"message": "boom"})
    timed_out = new_request("timed_out")
    with pytest.raises(ConflictError):
        post(timed_out, 0, [chunk("x")], done=True, usage=USAGE)
    assert rows(request_id) == [] and rows(timed_out) == []
    with pytest.raises(ConflictError):
        post(f"req_{uuid.uuid4().hex}", 0, [chunk("x")])  # no such request


def bounded_request() -> str:
    """A stream sent with max_tokens 4 and n 1 (at most 4 completion tokens, so at most
    4 + 8 + 8 batches) and a 50-byte prompt (at most 50 + 512 template tokens)."""
    request_id = new_request()
    RequestRecord(request_id).update(
        actions=[
            RequestRecord.max_tokens.set(4),
            RequestRecord.choices.set(1),
            RequestRecord.prompt_bytes.set(50),
        ]
    )
    return request_id


def test_a_done_batch_after_the_stream_completed_changes_nothing() -> None:
    request_id = new_request()
    post(request_id, 0, [chunk(None)])
    post(request_id, 1, [chunk("Hi", finish="stop"), USAGE_CHUNK], done=True, usage=USAGE)
    assert record(request_id).status == "completed"
    before = [(int(r.seq), r.chunks, r.done) for r in rows(request_id)]
    more = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    for seq, error in ((2, None), (7, None), (2, {"message": "forged"})):
        with pytest.raises(ConflictError):
            post(request_id, seq, [chunk("forged")], done=True, usage=more, error=error)
    assert [(int(r.seq), r.chunks, r.done) for r in rows(request_id)] == before
    stored = record(request_id)
    assert (stored.status, stored.total_tokens) == ("completed", 8)
    # The final batch that ended it, repeated, is still a duplicate.
    again = post(request_id, 1, [chunk("Hi", finish="stop"), USAGE_CHUNK], done=True, usage=USAGE)
    assert again == {"continue": True, "duplicate": True}


@pytest.mark.parametrize(
    "batch",
    [
        {"seq": -1},
        {"seq": 10**40},
        {"seq": 1_000_001},
        {"seq": "3"},
        {"seq": 2.5},
        {"seq": 21},  # past 4 tokens + 8 + 8 chunks
        {"seq": 0, "done": True, "usage": {"prompt_tokens": -10, "completion_tokens": 1}},
        {"seq": 0, "done": True, "usage": {"prompt_tokens": 5, "completion_tokens": 5}},
        {"seq": 0, "done": True, "usage": {"prompt_tokens": 563, "completion_tokens": 1}},
        {"seq": 0, "done": True, "usage": {"prompt_tokens": 1, "total_tokens": 10**30}},
    ],
    ids=[
        "negative-seq", "giant-seq", "seq-over-the-maximum", "string-seq", "fraction-seq",
        "seq-over-the-tokens", "negative-usage", "completion-over-max-tokens",
        "prompt-over-its-bytes", "giant-total",
    ],
)
def test_a_batch_out_of_range_is_400_and_changes_nothing(batch: dict[str, Any]) -> None:
    request_id = bounded_request()
    body = json.dumps({"request_id": request_id, "chunks": [chunk("x")], **batch}).encode()
    token = f"Bearer {callback_token(request_id)}"
    with pytest.raises(InvalidRequestError) as invalid:
        stream_sink.accept_stream_callback(request_id, token, body)
    assert invalid.value.status == 400
    assert rows(request_id) == []
    stored = record(request_id)
    assert (stored.status, stored.total_tokens, stored.stream_done_seq) == ("submitted", None, None)
    # The stream itself goes on.
    assert post(request_id, 0, [chunk("Hi")], done=True, usage=USAGE)["continue"] is True
    assert record(request_id).status == "completed"


def test_a_cancelled_stream_is_not_credited_by_its_last_report() -> None:
    request_id = bounded_request()
    post(request_id, 0, [chunk(None)])
    stream_sink.cancel(request_id)
    negative = {"prompt_tokens": 0, "completion_tokens": -100, "total_tokens": -100}
    with pytest.raises(InvalidRequestError):
        post(request_id, 1, [], done=True, usage=negative)
    assert record(request_id).total_tokens is None
    # The real report is still billed.
    generated = {"prompt_tokens": 0, "completion_tokens": 2, "total_tokens": 2}
    assert post(request_id, 1, [], done=True, usage=generated)["continue"] is False
    assert record(request_id).total_tokens == 2


# ---- the relay ---------------------------------------------------------------------------------


def test_out_of_order_batches_relay_in_order_once() -> None:
    request_id = new_request()

    async def scenario() -> list[bytes]:
        relayed = asyncio.create_task(collect(relay.relay(
            request_id, include_usage=False, deadline=time.monotonic() + 5)))
        post(request_id, 2, [chunk(" world", finish="stop"), USAGE_CHUNK], done=True, usage=USAGE)
        await asyncio.sleep(0.05)
        post(request_id, 0, [chunk(None)])
        await asyncio.sleep(0.05)
        assert post(request_id, 1, [chunk("Hello")]) == {"continue": True, "duplicate": False}
        return await relayed

    events = asyncio.run(scenario())
    expected = [chunk(None), chunk("Hello"), chunk(" world", finish="stop")]
    assert [data(e) for e in events] == [*map(_no_usage, expected), "[DONE]"]
    assert record(request_id).status == "completed"


def _no_usage(text: str) -> dict[str, Any]:
    parsed = json.loads(text)
    del parsed["usage"]
    return dict(parsed)


def test_usage_chunk_only_when_asked_for() -> None:
    request_id = new_request()
    stream = [chunk(None), chunk("Hi", finish="stop"), USAGE_CHUNK]
    post(request_id, 0, stream, done=True, usage=USAGE)
    without = relay_all(request_id)
    assert [data(e) for e in without] == [_no_usage(stream[0]), _no_usage(stream[1]), "[DONE]"]
    assert all(b'"usage"' not in e for e in without)
    with_usage = relay_all(request_id, include_usage=True)
    assert with_usage == [f"data: {c}\n\n".encode() for c in stream] + [b"data: [DONE]\n\n"]


def _running(text: str, completion: int) -> str:
    """The chunk as vLLM sends it with `continuous_usage_stats` (what the function asks for)."""
    parsed = json.loads(text)
    parsed["usage"] = {"prompt_tokens": 5, "completion_tokens": completion,
                       "total_tokens": 5 + completion}
    return json.dumps(parsed, separators=(",", ":"))


def test_running_usage_reaches_only_a_client_that_asked_for_it() -> None:
    request_id = new_request()
    stream = [_running(chunk(None), 0), _running(chunk("Hi", finish="stop"), 1), USAGE_CHUNK]
    post(request_id, 0, stream, done=True, usage=USAGE)
    without = relay_all(request_id)
    assert [data(e) for e in without] == [_no_usage(stream[0]), _no_usage(stream[1]), "[DONE]"]
    # include_usage alone: OpenAI's `"usage": null` on every chunk, the totals at the end.
    with_usage = [data(e) for e in relay_all(request_id, include_usage=True)]
    assert with_usage[:2] == [{**_no_usage(c), "usage": None} for c in stream[:2]]
    assert with_usage[2:] == [json.loads(USAGE_CHUNK), "[DONE]"]
    continuous = asyncio.run(collect(relay.relay(
        request_id, include_usage=True, continuous_usage=True,
        deadline=time.monotonic() + 5)))
    assert continuous == [f"data: {c}\n\n".encode() for c in stream] + [b"data: [DONE]\n\n"]


def test_error_batch_ends_without_done() -> None:
    request_id = new_request()
    error = {"message": "engine died", "type": "InternalServerError", "param": None, "code": 500}
    post(request_id, 0, [chunk(None), chunk("Hi")])
    post(request_id, 1, [], done=True, error=error, usage=USAGE)
    events = relay_all(request_id)
    assert [data(e) for e in events] == [_no_usage(chunk(None)), _no_usage(chunk("Hi")),
                                         {"error": error}]
    stored = record(request_id)
    assert stored.status == "failed" and stored.error == "engine died"
    assert stored.total_tokens == 8


def test_keep_alive_while_waiting() -> None:
    request_id = new_request()

    async def scenario() -> list[bytes]:
        relayed = asyncio.create_task(collect(relay.relay(
            request_id, include_usage=False, deadline=time.monotonic() + 5,
            keepalive_seconds=0.05)))
        await asyncio.sleep(0.3)
        post(request_id, 0, [chunk("Hi", finish="stop")], done=True, usage=USAGE)
        return await relayed

    events = asyncio.run(scenario())
    keepalives = [e for e in events if e == b": keep-alive\n\n"]
    assert 2 <= len(keepalives) <= 8
    assert [data(e) for e in events[-2:]] == [_no_usage(chunk("Hi", finish="stop")), "[DONE]"]
    assert set(events[:-2]) == {b": keep-alive\n\n"}


def test_relay_reads_only_new_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    request_id = new_request()
    original = StreamChunkBatch.query
    conditions: list[str] = []
    returned: list[int] = []

    def spy(hash_key: str, range_key_condition: Any = None, **options: Any) -> Any:
        if "attributes_to_get" in options:  # the done callback's count, not the relay
            return original(hash_key, range_key_condition, **options)
        conditions.append(str(range_key_condition))
        found = list(original(hash_key, range_key_condition, **options))
        returned.extend(int(row.seq) for row in found)
        return iter(found)

    monkeypatch.setattr(StreamChunkBatch, "query", spy)

    async def scenario() -> list[bytes]:
        relayed = asyncio.create_task(collect(relay.relay(
            request_id, include_usage=True, deadline=time.monotonic() + 5)))
        for seq in range(5):
            post(request_id, seq, [chunk(f"t{seq}")])
            await asyncio.sleep(0.03)
        post(request_id, 5, [USAGE_CHUNK], done=True, usage=USAGE)
        return await relayed

    events = asyncio.run(scenario())
    assert len(events) == 7
    assert sorted(returned) == list(range(6))  # every row read exactly once
    bounds = [int(c.split("'N': '")[1].split("'")[0]) for c in conditions if c.startswith("seq >")]
    assert len(bounds) == len(conditions) > 6
    assert bounds == sorted(bounds) and bounds[0] == -1 and bounds[-1] >= 4


def test_deadline_ends_with_a_timeout_error_and_cancels() -> None:
    request_id = new_request()
    post(request_id, 0, [chunk(None)])
    events = relay_all(request_id, timeout=0.2)
    assert data(events[0]) == _no_usage(chunk(None))
    error = data(events[-1])["error"]
    assert error["code"] == "compute_timeout" and request_id in error["message"]
    assert record(request_id).status == "cancelled"
    assert post(request_id, 1, [chunk("late")])["continue"] is False


def test_client_leaving_cancels_the_request() -> None:
    request_id = new_request()
    post(request_id, 0, [chunk(None)])

    async def scenario() -> None:
        events = relay.relay(request_id, include_usage=False,
                                 deadline=time.monotonic() + 5)
        await events.__anext__()
        await events.aclose()  # what the server does when the client disconnects

    asyncio.run(scenario())
    assert record(request_id).status == "cancelled"
    assert post(request_id, 1, [chunk("more")]) == {"continue": False, "duplicate": False}


def test_request_ended_elsewhere_ends_the_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "_STATUS_CHECK_S", 0.05)
    request_id = new_request()
    post(request_id, 0, [chunk(None)])

    async def scenario() -> list[bytes]:
        relayed = asyncio.create_task(collect(relay.relay(
            request_id, include_usage=False, deadline=time.monotonic() + 5)))
        await asyncio.sleep(0.1)
        # What the reconciler does when the task died without sending its final batch.
        records.finish(request_id, "failed", error="worker lost")
        return await relayed

    start = time.monotonic()
    events = asyncio.run(scenario())
    assert time.monotonic() - start < 1.0
    assert data(events[0]) == _no_usage(chunk(None))
    error = data(events[-1])["error"]
    assert error["code"] == "request_failed" and "worker lost" in error["message"]
    assert record(request_id).status == "failed"  # not turned into "cancelled"


# ---- end to end: the compute function, the callback over HTTP, the relay -----------------------


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[str, str]]:
    """(vLLM base URL, gateway base URL): the mock at 50 tokens/s and the stream callback."""

    async def callback(request: Request) -> Response:
        try:
            reply = await asyncio.to_thread(
                stream_sink.accept_stream_callback, request.path_params["request_id"],
                request.headers.get("authorization"), await request.body())
        except GatewayError as error:
            return JSONResponse(error.to_body(), status_code=error.status)
        return JSONResponse(reply)

    gateway = Starlette(routes=[
        Route("/callbacks/{request_id}/stream", callback, methods=["POST"])])
    with serve(create_app(MockConfig(tokens_per_second=50))) as vllm, serve(gateway) as base, \
            pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_BASE_URL", f"{vllm}/v1")
        yield vllm, base


def start_compute(stack: tuple[str, str], request_id: str, payload: dict[str, Any],
                  ) -> tuple[threading.Thread, dict[str, Any]]:
    _, base = stack
    out: dict[str, Any] = {}

    def run() -> None:
        out.update(vllm_streaming(payload, "chat/completions", request_id,
                                  f"{base}/callbacks/{request_id}/stream",
                                  callback_token(request_id)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_end_to_end_stream(stack: tuple[str, str]) -> None:
    request_id = new_request()
    payload = {"model": "meta-llama/Meta-Llama-3-8B-Instruct",
               "messages": [{"role": "user", "content": "Stream this [mock:tokens=20]"}]}

    async def scenario() -> list[tuple[float, bytes]]:
        start = time.monotonic()
        thread, _ = start_compute(stack, request_id, payload)
        timed = [(time.monotonic() - start, event) async for event in relay.relay(
            request_id, include_usage=False, deadline=time.monotonic() + 10)]
        thread.join(10)
        return timed

    timed = asyncio.run(scenario())
    events = [data(event) for _, event in timed]
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == (
        "".join(generate_text("meta-llama/Meta-Llama-3-8B-Instruct",
                              "user: Stream this [mock:tokens=20]", None)[0]))
    assert all("usage" not in e for e in events[:-1])
    print(f"first event to the client after {timed[0][0] * 1000:.0f} ms, "
          f"[DONE] after {timed[-1][0] * 1000:.0f} ms")
    assert timed[0][0] < 0.2 and timed[-1][0] > 0.35  # relayed while generated
    stored = record(request_id)
    assert stored.status == "completed" and stored.completion_tokens == 20


def test_end_to_end_client_leaves(stack: tuple[str, str]) -> None:
    request_id = new_request()
    payload = {"model": "meta-llama/Meta-Llama-3-8B-Instruct",
               "messages": [{"role": "user", "content": "Long one [mock:tokens=200]"}]}

    async def scenario() -> dict[str, Any]:
        thread, out = start_compute(stack, request_id, payload)
        events = relay.relay(request_id, include_usage=False,
                                 deadline=time.monotonic() + 10)
        for _ in range(3):
            await events.__anext__()
        await events.aclose()
        await asyncio.to_thread(thread.join, 10)
        return out

    start = time.monotonic()
    out = asyncio.run(scenario())
    assert out["cancelled"] is True and time.monotonic() - start < 1.5  # not the full 4 s
    stored = record(request_id)
    assert stored.status == "cancelled"
    # The prompt is billed too: vLLM's running usage came with every chunk read.
    assert 0 < stored.completion_tokens < 200
    assert stored.prompt_tokens == count_prompt_tokens("Long one [mock:tokens=200]") > 0
