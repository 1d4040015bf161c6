"""Nothing lost: the local stack with each fault switch on, driven by the real `openai` package.

Each group of tests starts its own small stack (`first-gateway dev --workers 2
--reconcile-every 1 ...` plus the switch) and checks the tables afterwards: every request ends in
exactly one terminal state with one usage record, a lost callback is recovered by the
reconciler, a duplicate changes nothing, and the client gets a clear error where the answer is
truly gone.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from first_local.globus_standin import mint_token
from first_local.stack import stack_process
from tests.contract.conftest import STACK_ENV, Stack
from tests.support.contract import usage_rows, wait_until_ended

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
MESSAGES: Any = [{"role": "user", "content": "Tell me about recovery."}]
SMALL = (
    "--workers",
    "2",
    "--reconcile-every",
    "1",
    "--reconcile-grace",
    "1",
    "--compute-api-limit",
    "0",
)


def small_stack(tmp_path: Path, *switches: str, result_wait: float = 30.0) -> Any:
    return stack_process(
        *SMALL,
        "--result-wait",
        str(result_wait),
        *switches,
        env=STACK_ENV,
        log=tmp_path / "stack.log",
    )


@pytest.fixture(scope="module")
def drop_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with small_stack(tmp_path_factory.mktemp("drop"), "--drop-callbacks", "1") as state:
        yield Stack(state["base_url"], state)






def chat(stack: Stack, **options: Any) -> Any:
    return stack.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, **options
    )


def stream_text(stack: Stack) -> tuple[str, str]:
    with stack.client().chat.completions.with_streaming_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, stream=True
    ) as response:
        request_id = response.headers["x-first-request-id"]
        parts = [
            chunk.choices[0].delta.content or ""
            for chunk in response.parse()
            if chunk.choices
        ]
    return request_id, "".join(parts)


def assert_ended_once(
    stack: Stack, request_id: str, status: str = "completed", timeout: float = 15.0
) -> dict[str, Any]:
    item = wait_until_ended(stack, request_id, timeout)
    assert item["status"] == status
    assert "open_status" not in item
    # The usage record is written right after the record ends.
    deadline = time.monotonic() + timeout
    while not (rows := usage_rows(stack, request_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(rows) == 1, rows
    assert rows[0]["status"] == status
    return item


# ---------------------------------------------------------------- --drop-callbacks 1


def test_a_dropped_callback_is_recovered_by_the_reconciler(drop_stack: Stack) -> None:
    raw = chat(drop_stack)
    reply = raw.parse()
    request_id = raw.headers["x-first-request-id"]
    assert reply.choices[0].message.content
    item = assert_ended_once(drop_stack, request_id)
    assert int(item["total_tokens"]) == reply.usage.total_tokens > 0


def test_a_stream_whose_batches_were_all_dropped_still_delivers_the_whole_text(
    drop_stack: Stack,
) -> None:
    expected = chat(drop_stack).parse().choices[0].message.content
    request_id, text = stream_text(drop_stack)
    assert text == expected
    item = assert_ended_once(drop_stack, request_id)
    assert int(item["completion_tokens"]) > 0


def test_a_batch_whose_done_callback_was_lost_is_finished_by_the_batch_driver(
    drop_stack: Stack,
) -> None:
    client = drop_stack.client()
    lines = [
        json.dumps(
            {
                "custom_id": f"lost-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": MESSAGES, "max_tokens": 5},
            }
        )
        for i in range(120)
    ]
    file = client.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 30
    while (batch := client.batches.retrieve(batch.id)).status != "completed":
        assert batch.status in ("validating", "in_progress", "finalizing"), batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    # Nothing but the task's return value said it was done: the driver ended it, once.
    assert batch.request_counts is not None and batch.request_counts.completed == 120
    answered = client.files.content(batch.output_file_id).text.splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in answered) == sorted(
        f"lost-{i}" for i in range(120)
    )
    assert len(usage_rows(drop_stack, batch.id)) == 1


def test_streams_with_some_batches_lost_deliver_every_text_in_order(tmp_path: Path) -> None:
    """Half the batches lost: a done batch over a hole waits; the reconciler fills the hole."""
    with small_stack(tmp_path, "--drop-callbacks", "0.5", "--mock-token-rate", "200") as state:
        stack = Stack(state["base_url"], state)
        expected = chat(stack).parse().choices[0].message.content
        for _ in range(3):
            request_id, text = stream_text(stack)
            assert text == expected
            assert_ended_once(stack, request_id)


# ---------------------------------------------------------------- --duplicate-callbacks 1


def test_duplicate_callbacks_change_nothing(tmp_path: Path) -> None:
    with small_stack(tmp_path, "--duplicate-callbacks", "1") as state:
        stack = Stack(state["base_url"], state)
        raw = chat(stack)
        request_id = raw.headers["x-first-request-id"]
        item = assert_ended_once(stack, request_id)
        assert int(item["total_tokens"]) == raw.parse().usage.total_tokens
        stream_id, text = stream_text(stack)
        assert text == raw.parse().choices[0].message.content
        assert_ended_once(stack, stream_id)
        time.sleep(1.5)  # late duplicates and a reconciler pass change nothing
        assert len(usage_rows(stack, request_id)) == len(usage_rows(stack, stream_id)) == 1


# ---------------------------------------------------------------- --fail-compute 1


def test_a_compute_function_that_raises_is_a_clear_error(tmp_path: Path) -> None:
    with small_stack(tmp_path, "--fail-compute", "1") as state:
        stack = Stack(state["base_url"], state)
        with pytest.raises(openai.APIStatusError) as raised:
            chat(stack)
        error = raised.value
        assert error.status_code == 502
        assert isinstance(error.body, dict) and "injected fault" in error.body["message"]
        request_id = error.response.headers["x-first-request-id"]
        item = assert_ended_once(stack, request_id, "failed")
        # Raised on the endpoint, read back through the real SDK as TaskExecutionFailed; the
        # reason is kept in the client's words (the exception's class is in the log only).
        assert "injected fault" in item["error"] and "RuntimeError" not in item["error"]


# ---------------------------------------------------------------- --kill-workers 1


def test_a_worker_killed_under_its_task_fails_that_request_once(tmp_path: Path) -> None:
    """The mock vLLM takes a second to answer and the worker dies within 0.2 s: nothing was
    called back, Globus Compute reports the task failed, and the reconciler ends the request
    with that reason while the client is still waiting. The endpoint gets a new worker."""
    with small_stack(tmp_path, "--kill-workers", "1", "--mock-delay", "1") as state:
        stack = Stack(state["base_url"], state)
        with pytest.raises(openai.APIStatusError) as raised:
            chat(stack)
        assert raised.value.status_code == 502
        assert "terminated abruptly" in raised.value.message
        request_id = raised.value.response.headers["x-first-request-id"]
        assert_ended_once(stack, request_id, "failed")
        # A stream whose task died before its first token: a 502, or (if the reconciler took
        # longer than the headers wait for a first event) an error event.
        opened: list[str] = []
        with (
            pytest.raises(openai.APIError, match="terminated abruptly") as streamed,
            stack.client().chat.completions.with_streaming_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=12, stream=True
            ) as response,
        ):
            opened.append(response.headers["x-first-request-id"])
            list(response.parse())
        refused = streamed.value
        if not opened:
            assert isinstance(refused, openai.APIStatusError) and refused.status_code == 502
            opened.append(refused.response.headers["x-first-request-id"])
        assert_ended_once(stack, opened[0], "failed")
        endpoints = stack.compute_standin("/_standin/endpoints")
        sophia = endpoints[state["compute_endpoints"]["sophia"]]
        assert sophia["details"]["total_workers"] == 2


# ---------------------------------------------------------------- --throttle-writes 0.2


def test_throttled_writes_are_retried(tmp_path: Path) -> None:
    with small_stack(tmp_path, "--throttle-writes", "0.2") as state:
        stack = Stack(state["base_url"], state)
        raw = chat(stack)
        assert raw.parse().choices[0].message.content
        # botocore backs off up to 2**attempt s between retries: a write throttled three
        # or four times in a row takes a while, but it lands.
        assert_ended_once(stack, raw.headers["x-first-request-id"], timeout=60)
        stream_id, text = stream_text(stack)
        assert text == raw.parse().choices[0].message.content
        assert_ended_once(stack, stream_id, timeout=60)


# ---------------------------------------------------------------- 504, then GET /v1/requests/{id}


def test_a_timed_out_wait_can_fetch_its_answer_later(tmp_path: Path) -> None:
    with small_stack(tmp_path, "--delay-callbacks", "2.5", result_wait=1.0) as state:
        stack = Stack(state["base_url"], state)
        with pytest.raises(openai.APIStatusError) as raised:
            chat(stack)
        assert raised.value.status_code == 504
        match = re.search(r"req_[0-9a-f]{32}", raised.value.message)
        assert match, raised.value.message
        request_id = match.group(0)
        url = f"{stack.base_url}/v1/requests/{request_id}"
        alice = {"Authorization": f"Bearer {mint_token('alice')}"}
        deadline = time.monotonic() + 15
        while True:
            answer = httpx.get(url, headers=alice, timeout=10)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            if body["status"] == "completed" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert body["status"] == "completed" and body["id"] == request_id
        assert body["object"] == "request" and body["model"] == MODEL
        assert body["usage"]["total_tokens"] > 0
        content = body["response"]["choices"][0]["message"]["content"]
        assert content
        dave = {"Authorization": f"Bearer {mint_token('dave')}"}
        other = httpx.get(url, headers=dave, timeout=10)
        assert other.status_code == 404
        assert other.json()["error"]["message"] == f"No request with id '{request_id}'."
        assert len(usage_rows(stack, request_id)) == 1
