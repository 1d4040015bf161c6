"""Waiting for a non-streamed answer: the request record, polled with a back-off, until the
update that ends it with its answer (the callback's, or the reconciler's) is seen; and what the
client gets for it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from first_core.errors import (
    NO_RETRY,
    ComputeTimeoutError,
    GatewayError,
    InvalidRequestError,
    UpstreamError,
    public_message,
)
from first_core.inference import records, results
from first_core.inference.submit import Submission
from first_core.settings import get_settings

# Polling the request record: the pause grows with the time already waited (a tenth of it), so
# a warm model's answer is seen within milliseconds and a queued job costs a few reads a second.
_MIN_POLL_S = 0.005
_MAX_POLL_S = 0.25
# No answer comes back sooner than this after the submit (the task's trip through Globus
# Compute and the engine, vLLM, the callback's write): a poll at once would always miss.
_FIRST_POLL_S = 0.010


def remember_task(submission: Submission) -> asyncio.Task[None]:
    """Write the task id only if the answer is slow to come (`task_id_write_after_seconds`):
    only the reconciler needs it, to look up a task whose callback was lost, and it looks only
    at requests still open long after that. (A queued request's submitter writes its own.)
    `forget_task` when the answer came."""
    return asyncio.create_task(_remember_later(submission))


async def _remember_later(submission: Submission) -> None:
    if submission.task_id is None:
        return
    await asyncio.sleep(get_settings().task_id_write_after_seconds)
    await asyncio.to_thread(records.set_task, submission.request_id, submission.task_id)


async def forget_task(remembering: asyncio.Task[None]) -> None:
    """The answer came (or the request ended): a task-id write not yet due is not made; one
    under way finishes on its thread."""
    remembering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await remembering


async def remember_now(submission: Submission, remembering: asyncio.Task[None]) -> None:
    """The wait ended but the request runs on (a 504): its task id is written now, if it is
    not yet, so the reconciler can find the task should its callback be lost."""
    if remembering.done():
        return
    await forget_task(remembering)
    if submission.task_id is not None:
        await asyncio.to_thread(records.set_task, submission.request_id, submission.task_id)


async def wait_for_result(submission: Submission) -> results.Result:
    """Poll the request record (one consistent GetItem a poll, adaptive back-off) until it holds
    its answer."""
    remembering = remember_task(submission)
    try:
        return await _poll(submission)
    except ComputeTimeoutError:
        await remember_now(submission, remembering)
        raise
    finally:
        await forget_task(remembering)


async def _poll(submission: Submission) -> results.Result:
    started = time.monotonic()
    await asyncio.sleep(_FIRST_POLL_S)
    while True:
        result = await asyncio.to_thread(results.load, submission.request_id)
        if result is not None:
            return result
        now = time.monotonic()
        delay = min(max(_MIN_POLL_S, (now - started) / 10), _MAX_POLL_S)
        if now + delay > submission.deadline:
            raise ComputeTimeoutError(
                f"The cluster did not answer within {get_settings().result_wait_seconds:.0f} s. "
                f"Your request {submission.request_id} is still running; fetch its result later "
                f"with GET /v1/requests/{submission.request_id}."
            )
        await asyncio.sleep(delay)


def raise_for_result(result: results.Result) -> Any:
    """The body to send back, or the OpenAI-shaped error a failed result stands for. A failure
    after the model produced output is not to be retried: a retry would produce it again."""
    if result.status_code < 400:
        return result.body
    error = backend_error(result.status_code, results.error_message(result.body))
    if result.status_code >= 500 and _produced_output(result.body):
        error.headers.update(NO_RETRY)
    raise error


def _produced_output(body: Any) -> bool:
    usage = body.get("usage") if isinstance(body, dict) else None
    tokens = (
        usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(usage, dict)
        else None
    )
    code = (body.get("error") or {}).get("code") if isinstance(body, dict) else None
    return (isinstance(tokens, int) and tokens > 0) or code == "result_too_large"


def backend_error(status: int, message: str, param: str | None = None) -> GatewayError:
    """What the client gets when vLLM refused (4xx, passed on) or failed (502) a request."""
    # The cluster's words may name its exception classes or vLLM's address: not for clients.
    if status < 500:
        refused = InvalidRequestError(
            public_message(message, "The model backend refused the request."),
            param=param,
            code="backend_rejected",
        )
        refused.status = status
        return refused
    return UpstreamError(f"The model backend failed: {public_message(message)}")
