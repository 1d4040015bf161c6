"""Waiting for a non-streamed answer (first_core.inference.wait): the task id is written only
when the answer is slow or the wait ends without it (a 504), never for a quick answer."""

from __future__ import annotations

import asyncio
import time

import pytest

from first_core import schemas
from first_core.errors import ComputeTimeoutError
from first_core.inference import records, results
from first_core.inference.submit import Submission
from first_core.inference.wait import wait_for_result
from first_core.settings import get_settings
from first_core.tables import RequestRecord
from tests.support.identities import CALLER
from tests.support.registry import ENDPOINT

REQUEST_ID = "req_0000000000000000000000000000000a"
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def submission(wait_seconds: float = 5.0) -> Submission:
    records.create(REQUEST_ID, CALLER, ENDPOINT, "chat/completions", False, "sophia: test")
    asked = {"model": ENDPOINT.model, "messages": [{"role": "user", "content": "x"}]}
    body = schemas.parse_request("chat/completions", asked)
    return Submission(
        REQUEST_ID, "task-1", ENDPOINT, "sophia: test", body, time.monotonic() + wait_seconds
    )


async def answered_after(seconds: float, waiting: Submission) -> results.Result:
    async def answer() -> None:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(results.record, REQUEST_ID, 200, ANSWER)

    answering = asyncio.create_task(answer())
    result = await wait_for_result(waiting)
    await answering
    return result


def task_id() -> str | None:
    return RequestRecord.get(REQUEST_ID, consistent_read=True).task_id


def test_a_quick_answer_writes_no_task_id(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "task_id_write_after_seconds", 1.0)
    result = asyncio.run(answered_after(0.05, submission()))
    assert result.body == ANSWER
    time.sleep(0.1)
    assert task_id() is None


def test_a_slow_answer_has_its_task_id_written(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "task_id_write_after_seconds", 0.05)
    result = asyncio.run(answered_after(0.4, submission()))
    assert result.body == ANSWER
    assert task_id() == "task-1"


def test_a_wait_that_times_out_writes_the_task_id(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "task_id_write_after_seconds", 60.0)
    with pytest.raises(ComputeTimeoutError):
        asyncio.run(wait_for_result(submission(wait_seconds=0.1)))
    assert task_id() == "task-1"  # the reconciler can look the running task up
