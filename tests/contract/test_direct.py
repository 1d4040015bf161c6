"""Direct backends on the real local stack: the `direct` cluster of infra/registry/local.yaml is an
OpenAI-compatible upstream (the stack's own mock, which checks the gateway's key) that the proxy
calls itself, with the official `openai` package as the client."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from first_local.globus_standin import mint_token
from first_local.stack import DIRECT_DEV_KEY, DIRECT_KEY_VARIABLE
from tests.contract.conftest import Stack
from tests.support.contract import rows, usage_rows, wait_for

pytestmark = pytest.mark.contract

DIRECT_MODEL = "openai/gpt-oss-20b"
CHAT = [{"role": "user", "content": "Say something about direct backends."}]
# infra/registry/local.yaml's `timeout` for the direct backend.
DIRECT_TIMEOUT_S = 5.0


def upstream(stack: Stack, path: str, body: dict[str, Any] | None = None) -> Any:
    """A `/_standin/...` answer of the direct backend's mock upstream."""
    base = stack.state["direct_url"].removesuffix("/v1")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def upstream_client(stack: Stack) -> openai.OpenAI:
    """The upstream itself, with the gateway's key: what the gateway's answers are compared to."""
    return openai.OpenAI(base_url=stack.state["direct_url"], api_key=DIRECT_DEV_KEY, max_retries=0)


def record(stack: Stack, request_id: str, status: str = "completed") -> dict[str, Any]:
    """The request's record once it has `status` (a stream's is written as its relay ends)."""
    deadline = time.monotonic() + 5
    while True:
        item = stack.item("requests", request_id)
        if (item and item["status"] == status) or time.monotonic() > deadline:
            assert item is not None, f"no record for {request_id}"
            return item
        time.sleep(0.05)


def assert_recorded(stack: Stack, request_id: str, usage: Any) -> None:
    """One record and one usage record, each with the upstream's token counts."""
    item = record(stack, request_id)
    assert item["status"] == "completed"
    assert item["cluster"] == "direct"
    assert item["model"] == DIRECT_MODEL
    counts = (item["prompt_tokens"], item["completion_tokens"], item["total_tokens"])
    assert counts == (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
    rows = usage_rows(stack, request_id)
    assert len(rows) == 1
    row = rows[0]
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == counts
    assert row["status"] == "completed"


def test_the_direct_model_is_listed_with_its_cluster(stack: Stack) -> None:
    listed = {m.id: m for m in stack.client().models.list()}

    assert DIRECT_MODEL in listed
    assert listed[DIRECT_MODEL].model_extra["clusters"] == ["direct"]


def test_non_streamed_chat_is_the_upstreams_answer_with_one_record_and_usage(
    stack: Stack,
) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model=DIRECT_MODEL, messages=CHAT, max_tokens=12
    )
    reply = raw.parse()
    direct = upstream_client(stack).chat.completions.create(
        model=DIRECT_MODEL, messages=CHAT, max_tokens=12
    )

    assert reply.model == DIRECT_MODEL
    assert reply.choices[0].message.content == direct.choices[0].message.content
    assert reply.usage == direct.usage
    request_id = raw.headers["x-first-request-id"]
    assert raw.headers["x-first-cluster"] == "direct"
    assert_recorded(stack, request_id, reply.usage)
    shown = httpx.get(
        f"{stack.base_url}/v1/requests/{request_id}",
        headers={"Authorization": f"Bearer {mint_token('alice')}"},
    ).json()
    assert shown["status"] == "completed"
    assert shown["response"]["choices"][0]["message"]["content"] == reply.choices[0].message.content


def test_streamed_chat_is_relayed_event_by_event_with_its_usage(stack: Stack) -> None:
    client = stack.client()
    with client.chat.completions.with_streaming_response.create(
        model=DIRECT_MODEL,
        messages=CHAT,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    ) as raw:
        request_id = raw.headers["x-first-request-id"]
        chunks = list(raw.parse())
    plain = list(
        client.chat.completions.create(
            model=DIRECT_MODEL, messages=CHAT, max_tokens=12, stream=True
        )
    )
    whole = client.chat.completions.create(model=DIRECT_MODEL, messages=CHAT, max_tokens=12)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage == whole.usage
    # The gateway asked the upstream for usage; a client that did not gets no usage chunk.
    assert all(c.choices and c.usage is None for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == text
    assert_recorded(stack, request_id, usage)


def test_completions_and_embeddings(stack: Stack) -> None:
    client = stack.client()
    upstream_answer = upstream_client(stack).completions.create(
        model=DIRECT_MODEL, prompt="Once upon a time", max_tokens=6
    )

    raw = client.completions.with_raw_response.create(
        model=DIRECT_MODEL, prompt="Once upon a time", max_tokens=6
    )
    completion = raw.parse()
    assert completion.choices[0].text == upstream_answer.choices[0].text
    assert_recorded(stack, raw.headers["x-first-request-id"], completion.usage)

    embedded = client.embeddings.with_raw_response.create(
        model=DIRECT_MODEL, input=["a", "b c"]
    )
    embeddings = embedded.parse()
    assert len(embeddings.data) == 2
    assert embeddings.usage.prompt_tokens > 0
    item = record(stack, embedded.headers["x-first-request-id"])
    assert item["prompt_tokens"] == embeddings.usage.prompt_tokens


def test_the_cluster_path_reaches_the_direct_backend(stack: Stack) -> None:
    client = stack.client(federated=False, cluster="direct")

    reply = client.chat.completions.create(model=DIRECT_MODEL, messages=CHAT, max_tokens=4)

    assert reply.model == DIRECT_MODEL
    assert reply.usage is not None and reply.usage.completion_tokens == 4


@pytest.fixture
def wrong_key_upstream(stack: Stack) -> Iterator[None]:
    """The upstream now requires another key than the one the gateway holds."""
    upstream(stack, "/_standin/api-key", {"api_key": "a-key-the-gateway-does-not-have"})
    try:
        yield
    finally:
        upstream(stack, "/_standin/api-key", {"api_key": DIRECT_DEV_KEY})


def test_a_refused_key_is_a_502_that_names_no_secret(
    stack: Stack, wrong_key_upstream: None
) -> None:
    with pytest.raises(openai.APIStatusError) as refused:
        stack.client().chat.completions.create(model=DIRECT_MODEL, messages=CHAT, max_tokens=4)

    assert refused.value.status_code == 502
    body = refused.value.response.json()
    assert body["error"]["code"] == "upstream_auth_failed"
    assert "credentials" in body["error"]["message"]
    text = refused.value.response.text
    for secret in (DIRECT_DEV_KEY, DIRECT_KEY_VARIABLE, "Bearer"):
        assert secret not in text
    request_id = refused.value.response.headers["x-first-request-id"]
    item = record(stack, request_id, "failed")
    assert item["status"] == "failed"
    assert DIRECT_DEV_KEY not in json.dumps(item, default=str)
    assert DIRECT_DEV_KEY not in Path(stack.state["log"]).read_text(errors="replace")


def test_a_hanging_upstream_is_a_504_within_its_timeout(stack: Stack) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as hung:
        stack.client().chat.completions.create(
            model=DIRECT_MODEL,
            messages=[{"role": "user", "content": "wait [mock:delay=15000]"}],
            max_tokens=4,
        )
    took = time.monotonic() - started

    assert hung.value.status_code == 504
    assert hung.value.response.headers["x-should-retry"] == "false"
    assert DIRECT_TIMEOUT_S - 0.5 <= took < DIRECT_TIMEOUT_S + 3
    request_id = hung.value.response.headers["x-first-request-id"]
    assert record(stack, request_id, "timed_out")["status"] == "timed_out"


def test_a_client_that_leaves_mid_stream_closes_the_upstream_stream(stack: Stack) -> None:
    before = upstream(stack, "/_standin/streams")
    slow = [{"role": "user", "content": "slowly [mock:rate=5] [mock:tokens=200]"}]
    with stack.client().chat.completions.with_streaming_response.create(
        model=DIRECT_MODEL, messages=slow, max_tokens=200, stream=True
    ) as raw:
        request_id = raw.headers["x-first-request-id"]
        stream = iter(raw.parse())
        next(stream), next(stream)  # the stream is flowing; then the client leaves
        assert upstream(stack, "/_standin/streams")["open"] >= 1

    deadline = time.monotonic() + 10
    while True:
        after = upstream(stack, "/_standin/streams")
        if after["disconnected"] > before["disconnected"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after["disconnected"] == before["disconnected"] + 1
    assert after["open"] == 0
    assert record(stack, request_id, "cancelled")["status"] == "cancelled"


def test_responses_and_messages_streamed_and_not(stack: Stack) -> None:
    client = stack.client()
    expected = upstream_client(stack).responses.create(model=DIRECT_MODEL, input="Hello there")

    raw = client.responses.with_raw_response.create(model=DIRECT_MODEL, input="Hello there")
    response = raw.parse()
    assert response.output_text == expected.output_text
    item = record(stack, raw.headers["x-first-request-id"])
    assert item["completion_tokens"] == response.usage.output_tokens
    events = list(client.responses.create(model=DIRECT_MODEL, input="Hello there", stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == expected.output_text

    claude = anthropic.Anthropic(
        base_url=stack.base_url, auth_token=mint_token("alice"), max_retries=0
    )
    messages = [{"role": "user", "content": "Hello there"}]
    message = claude.messages.with_raw_response.create(
        model=DIRECT_MODEL, max_tokens=16, messages=messages
    )
    parsed = message.parse()
    assert parsed.type == "message" and parsed.content[0].text
    usage = usage_rows(stack, message.headers["x-first-request-id"])[0]
    assert int(usage["completion_tokens"]) == parsed.usage.output_tokens
    with claude.messages.stream(model=DIRECT_MODEL, max_tokens=16, messages=messages) as stream:
        request_id = stream.response.headers["x-first-request-id"]
        text = "".join(stream.text_stream)
    assert text == parsed.content[0].text
    streamed = record(stack, request_id)
    assert streamed["completion_tokens"] == parsed.usage.output_tokens


def test_a_batch_on_the_direct_backend_runs_from_the_batch_driver(stack: Stack) -> None:
    client = stack.client()
    lines = [
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": DIRECT_MODEL, "messages": CHAT, "max_tokens": 4 + i},
            }
        )
        for i in range(5)
    ]
    file = client.files.create(file=("direct.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    ended = wait_for(client, batch.id, timeout=60)

    assert ended.status == "completed", ended
    assert ended.request_counts.completed == 5 and ended.request_counts.failed == 0
    output = rows(client, ended.output_file_id)
    by_id = {row["custom_id"]: row["response"] for row in output}
    assert sorted(by_id) == [f"line-{i}" for i in range(5)]
    for i in range(5):
        body = by_id[f"line-{i}"]["body"]
        assert by_id[f"line-{i}"]["status_code"] == 200
        assert body["model"] == DIRECT_MODEL
        assert body["usage"]["completion_tokens"] == 4 + i
    record = stack.table("batches").get_item(Key={"batch_id": batch.id}, ConsistentRead=True)
    item = record["Item"]
    assert item["task_id"] == "direct"  # no Globus Compute task: the driver ran it
    completion = sum(4 + i for i in range(5))
    assert int(item["completion_tokens"]) == completion
    usage = usage_rows(stack, batch.id)
    assert len(usage) == 1 and int(usage[0]["completion_tokens"]) == completion
