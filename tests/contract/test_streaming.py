"""Streaming through the real local stack with the real `openai` package: tokens relayed as
the (mock) cluster produces them, exactly in OpenAI's shapes."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import CALLBACK_SECRET
from tests.contract.conftest import Stack

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
MESSAGES = [{"role": "user", "content": "Tell me about streaming on supercomputers."}]


def wait_for(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.mark.parametrize(("federated", "cluster"), [(True, "sophia"), (False, "polaris")])
def test_streamed_chat_equals_the_non_streamed_answer(
    stack: Stack, federated: bool, cluster: str
) -> None:
    client = stack.client(federated=federated, cluster=cluster)
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40)
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, stream=True)
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    # vLLM's shape: the role first, one chunk per token, finish_reason on the last content chunk.
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert whole.usage is not None
    assert len(content) == whole.usage.completion_tokens
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
        whole.choices[0].message.content
    )
    assert all(c.usage is None for c in chunks), "no usage chunk unless asked for"


def test_streamed_completions_equal_the_non_streamed_text(stack: Stack) -> None:
    client = stack.client()
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=30)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=30, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_usage_chunk_when_asked_and_usage_recorded_either_way(stack: Stack) -> None:
    client = stack.client()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=25,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(raw.parse())
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 25
    assert all(c.usage is None for c in chunks[:-1])
    record = wait_for(lambda: _ended(stack, raw.headers["x-first-request-id"]))
    assert record["status"] == "completed"
    assert record["completion_tokens"] == Decimal(25)
    assert record["total_tokens"] == Decimal(last.usage.total_tokens)

    quiet = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=25, stream=True
    )
    assert all(c.usage is None for c in quiet.parse())
    record = wait_for(lambda: _ended(stack, quiet.headers["x-first-request-id"]))
    assert record["status"] == "completed"
    assert record["completion_tokens"] == Decimal(25)


def _ended(stack: Stack, request_id: str) -> dict[str, Any] | None:
    item = stack.item("requests", request_id)
    if item and item["status"] in {"completed", "failed", "cancelled"} and "total_tokens" in item:
        return item
    return None


def test_backend_failure_mid_stream_is_an_error_event(stack: Stack) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "go [mock:error-after=3]"}],
        stream=True,
    )
    received = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in raw.parse():
            received.append(chunk)
    assert len([c for c in received if c.choices and c.choices[0].delta.content]) == 3
    assert raised.value.message
    request_id = raw.headers["x-first-request-id"]
    # The error event is relayed as soon as its batch is stored; the record ends right after.
    record = wait_for(
        lambda: (item := stack.item("requests", request_id)) and item["status"] != "submitted"
        and item
    )
    assert record["status"] == "failed"
    assert record["error"]


def test_client_that_leaves_early_cancels_the_request_and_the_cluster_stops(stack: Stack) -> None:
    slow = [{"role": "user", "content": "a long one [mock:tokens=400] [mock:rate=40]"}]
    raw = stack.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=slow, stream=True
    )
    request_id = raw.headers["x-first-request-id"]
    stream = raw.parse()
    for seen, _ in enumerate(stream):
        if seen >= 4:
            break
    stream.close()
    record = wait_for(
        lambda: (
            (item := stack.item("requests", request_id))
            and item["status"] == "cancelled"
            and "completion_tokens" in item
            and item
        )
    )
    assert record, "the request ends cancelled, with the usage of what was generated"
    generated = int(record["completion_tokens"])
    assert 4 <= generated < 100, generated
    # The compute function stopped reading vLLM: no batch lands after the cancel settles.
    batches = _batch_count(stack, request_id)
    time.sleep(1.0)
    assert _batch_count(stack, request_id) == batches


def _batch_count(stack: Stack, request_id: str) -> int:
    from boto3.dynamodb.conditions import Key

    table = stack.table("stream_chunks")
    return int(
        table.query(KeyConditionExpression=Key("request_id").eq(request_id), Select="COUNT")[
            "Count"
        ]
    )


def test_out_of_order_and_duplicate_batches_come_out_in_order_once(stack: Stack) -> None:
    # The real compute function waits 5 s before its first token, so the batches posted here are
    # the stream; when its own batches come, the request has ended and they are refused.
    delayed = [{"role": "user", "content": "hold on [mock:delay=5000]"}]
    raw = stack.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=delayed, stream=True
    )
    request_id = raw.headers["x-first-request-id"]
    token = hmac.new(CALLBACK_SECRET.encode(), request_id.encode(), hashlib.sha256).hexdigest()

    def chunk(text: str, finish: str | None = None) -> str:
        return json.dumps(
            {
                "id": "chatcmpl-test",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": MODEL,
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
            }
        )

    batches = {
        0: {"chunks": [chunk("one"), chunk(" two")], "done": False},
        1: {"chunks": [chunk(" three")], "done": False},
        2: {
            "chunks": [chunk(" four", "stop")],
            "done": True,
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        },
    }
    replies = []

    def post_batches() -> None:
        for seq in [2, 0, 2, 0, 1, 1]:
            replies.append(
                httpx.post(
                    f"{stack.base_url}/callbacks/{request_id}/stream",
                    json={"request_id": request_id, "seq": seq, **batches[seq]},
                    headers={"Authorization": f"Bearer {token}"},
                ).json()
            )

    poster = threading.Thread(target=post_batches)
    poster.start()
    texts = [c.choices[0].delta.content for c in raw.parse() if c.choices]
    poster.join()
    assert texts == ["one", " two", " three", " four"]
    assert [r["duplicate"] for r in replies] == [False, False, True, True, False, True]
    record = wait_for(lambda: _ended(stack, request_id))
    assert record["status"] == "completed"
    assert record["total_tokens"] == Decimal(7)


def test_a_finished_stream_can_be_read_back_whole(stack: Stack) -> None:
    """A client whose connection dropped after the stream reads the whole answer later."""
    client = stack.client()
    with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Read me back later [mock:tokens=40]"}],
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        request_id = response.headers["x-first-request-id"]
        chunks = list(response.parse())
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None

    def ended() -> Any:
        answer = httpx.get(
            f"{stack.base_url}/v1/requests/{request_id}",
            headers={"Authorization": f"Bearer {client.api_key}"},
        ).json()
        return answer if answer["status"] == "completed" else None

    view = wait_for(ended)
    assert view["stream"] is True
    body = view["response"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == streamed
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert body["choices"][0]["finish_reason"] == next(f for f in reversed(finish) if f)
    assert body["usage"]["completion_tokens"] == usage.completion_tokens == 40


def test_a_stream_vllm_refuses_at_once_is_an_http_error(stack: Stack) -> None:
    """Over the model's context: vLLM answers 400 before any token, and so does the gateway
    (the SDK raises BadRequestError on `create`, as with OpenAI), with the request id."""
    client = stack.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "a prompt that does not fit"}],
            max_tokens=8192,  # the endpoint allows it; the model's context (8192) does not
            stream=True,
        )
    assert "maximum context length" in refused.value.message
    request_id = refused.value.response.headers["x-first-request-id"]
    record = wait_for(
        lambda: (item := stack.item("requests", request_id)) and item["status"] != "submitted"
        and item
    )
    assert record["status"] == "failed"
