"""Retries that never run a job twice, with the real `openai` package (its default retries on)
against the local stack (the session's stack waits 4 s for an answer before a 504):

- a 504 for a request still running says `x-should-retry: false`, so one SDK call is one job;
- `Idempotency-Key`: a repeat with the same key gets the first request (waits on it, or its
  stored answer), with the same `x-first-request-id`; concurrent repeats start one job; a batch
  created again with the same key is the same batch.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import openai
import pytest
from boto3.dynamodb.conditions import Attr

from first_local.globus_standin import mint_token
from tests.contract.conftest import Stack
from tests.support.contract import (
    MODEL,
    line,
    scan_all,
    upload,
    usage_rows,
    user_id,
    wait_for,
    wait_until_ended,
)

SLOW = [{"role": "user", "content": "Take your time [mock:delay=6000]"}]


def sdk(stack: Stack) -> openai.OpenAI:
    """As a user has it: the SDK's default retries (2) and timeout."""
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=mint_token("alice"))


def requests_since(stack: Stack, since: float) -> list[dict[str, Any]]:
    uid = user_id(stack, "alice")
    return scan_all(
        stack, "requests", Attr("user_id").eq(uid) & Attr("created_at").gte(Decimal(str(since)))
    )


def test_a_504_is_not_retried_by_the_sdk_and_is_one_job(stack: Stack) -> None:
    since = time.time()
    with pytest.raises(openai.APIStatusError) as timed_out:
        sdk(stack).chat.completions.create(model=MODEL, messages=SLOW, max_tokens=5)

    response = timed_out.value.response
    assert response.status_code == 504 and response.headers["x-should-retry"] == "false"
    request_id = response.headers["x-first-request-id"]
    assert request_id in timed_out.value.message  # so the user can fetch it later
    assert [r["request_id"] for r in requests_since(stack, since)] == [request_id]
    # It ran on, once: its answer and one usage record.
    assert wait_until_ended(stack, request_id, timeout=30)["status"] == "completed"
    deadline = time.monotonic() + 10  # the usage record follows the record's end
    while not usage_rows(stack, request_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(usage_rows(stack, request_id)) == 1


def test_a_repeat_with_the_same_key_is_the_same_request(stack: Stack) -> None:
    key = {"Idempotency-Key": f"key-{uuid.uuid4()}"}
    since = time.time()
    chat = sdk(stack).chat.completions.with_raw_response
    hello = [{"role": "user", "content": "Hello [mock:tokens=5]"}]

    first = chat.create(model=MODEL, messages=hello, max_tokens=5, extra_headers=key)
    again = chat.create(model=MODEL, messages=hello, max_tokens=5, extra_headers=key)

    assert first.headers["x-first-request-id"] == again.headers["x-first-request-id"]
    assert first.parse().model_dump() == again.parse().model_dump()
    assert len(requests_since(stack, since)) == 1
    # The same key with another body is a client bug, not a repeat.
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(stack).chat.completions.create(
            model=MODEL, messages=SLOW, max_tokens=5, extra_headers=key
        )
    assert refused.value.body["code"] == "idempotency_key_reused"  # type: ignore[index]


def test_concurrent_repeats_start_one_job(stack: Stack) -> None:
    key = {"Idempotency-Key": f"key-{uuid.uuid4()}"}
    since = time.time()
    chat = sdk(stack).chat.completions.with_raw_response
    hello = [{"role": "user", "content": "Together [mock:tokens=5]"}]

    def ask(_: int) -> str:
        answer = chat.create(model=MODEL, messages=hello, max_tokens=5, extra_headers=key)
        return str(answer.headers["x-first-request-id"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        ids = set(pool.map(ask, range(4)))

    assert len(ids) == 1
    assert [r["request_id"] for r in requests_since(stack, since)] == list(ids)


def test_after_a_504_the_repeat_gets_the_answer_of_the_first_request(stack: Stack) -> None:
    key = {"Idempotency-Key": f"key-{uuid.uuid4()}"}
    since = time.time()
    with pytest.raises(openai.APIStatusError) as timed_out:
        sdk(stack).chat.completions.create(
            model=MODEL, messages=SLOW, max_tokens=5, extra_headers=key
        )
    request_id = timed_out.value.response.headers["x-first-request-id"]
    wait_until_ended(stack, request_id, timeout=30)

    repeat = sdk(stack).chat.completions.with_raw_response.create(
        model=MODEL, messages=SLOW, max_tokens=5, extra_headers=key
    )

    assert repeat.headers["x-first-request-id"] == request_id
    assert repeat.parse().choices[0].message.content
    assert len(requests_since(stack, since)) == 1


def test_a_batch_created_again_with_the_same_key_is_the_same_batch(stack: Stack) -> None:
    client = sdk(stack)
    key = {"Idempotency-Key": f"key-{uuid.uuid4()}"}
    lines = [line(f"r{i}", f"Hello {i}", max_tokens=3) for i in range(2)]
    file = upload(client, lines)

    def create() -> Any:
        return client.batches.create(
            input_file_id=file.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_headers=key,
        )

    first, again = create(), create()

    assert first.id == again.id
    ended = wait_for(client, first.id)
    assert ended.status == "completed" and ended.request_counts.total == 2
