"""The inference path the proxy runs: validate, route, record, submit, then wait for the result.

The proxy function is a thin ASGI adapter around `submit` and `wait_for_result`; everything a
request goes through is here, in the order it happens.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from first_core import ratelimit, records, results, schemas, streaming, submit_queue
from first_core.auth import Caller
from first_core.compute import budget, get_backend
from first_core.errors import (
    ComputeTimeoutError,
    GatewayError,
    InvalidRequestError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UpstreamError,
)
from first_core.registry import Endpoint, Registry, routing
from first_core.settings import get_settings

INFERENCE_PATHS = ("chat/completions", "completions", "embeddings")

# Polling the results table: the pause grows with the time already waited (a tenth of it), so
# a warm model's answer is seen within milliseconds and a queued job costs a few reads a second.
_MIN_POLL_S = 0.005
_MAX_POLL_S = 0.25


@dataclass(frozen=True)
class Submission:
    request_id: str
    task_id: str | None  # None while it waits in the submit queue
    endpoint: Endpoint
    route_reason: str
    request: schemas.RequestBody
    deadline: float


def submit(
    caller: Caller,
    openai_path: str,
    raw_body: bytes,
    cluster: str | None = None,
    framework: str | None = None,
    exclude: frozenset[str] = frozenset(),
) -> Submission:
    settings = get_settings()
    if len(raw_body) > settings.max_payload_bytes:
        raise PayloadTooLargeError(
            f"Request body is {len(raw_body)} bytes; the limit is {settings.max_payload_bytes}."
        )
    request = schemas.parse_request(openai_path, raw_body)  # type: ignore[arg-type]
    stream = request.wants_stream()
    route = routing.choose(
        Registry.current(), caller, request.model, cluster, framework, exclude=exclude
    )
    endpoint = route.endpoint
    limit = endpoint.limits.max_tokens
    asked = request.max_output_tokens()
    if limit is not None and asked is not None and asked > limit:
        raise InvalidRequestError(
            f"max_tokens is {asked}; '{endpoint.model}' allows at most {limit}.",
            param="max_tokens",
            code="invalid_value",
        )

    function_id = endpoint.functions.streaming if stream else endpoint.functions.inference
    if function_id is None:
        raise InvalidRequestError(
            f"Streaming is not available for '{endpoint.model}' on cluster '{endpoint.cluster}'.",
            param="stream",
        )

    # The rate limits, before anything is written or submitted: over a limit this raises 429
    # with nothing taken and nothing recorded.
    reservation = ratelimit.reserve(
        caller.user_id,
        endpoint,
        ratelimit.prompt_estimate(len(raw_body)),
        0 if openai_path == "embeddings" else asked,
        int(getattr(request, "n", None) or 1),
    )
    # Globus Compute's API budget (compute/budget.py): a unit now, or the submit queue, whose
    # submitter sends the waiting requests of an endpoint in one batch. (Without a queue, wait
    # a few windows for a unit.)
    queued = False
    try:
        budget.spend(wait=0.0 if settings.submit_queue_url else None)
    except budget.BudgetExhausted:
        if not settings.submit_queue_url:
            ratelimit.settle(reservation.to_json(), 0)
            raise
        queued = True
    request_id = records.new_request_id()
    try:
        records.create(
            request_id,
            caller,
            endpoint,
            openai_path,
            stream,
            route.reason,
            rate_reservation=reservation.to_json() if reservation.counters else None,
            queued=queued,
        )
    except BaseException:
        ratelimit.settle(reservation.to_json(), 0)
        raise
    payload: dict[str, Any] = json.loads(raw_body)
    if not stream:
        # Nothing streams, so there is nothing to configure; vLLM would refuse the key.
        payload.pop("stream_options", None)
    task_id: str | None = None
    try:
        if queued:
            submit_queue.enqueue(
                submit_queue.QueuedRequest(
                    request_id, endpoint.endpoint_id, function_id, openai_path, stream, payload
                )
            )
        else:
            kwargs = submit_queue.task_kwargs(request_id, openai_path, stream, payload)
            with budget.prepaid():
                task_id = get_backend().submit(endpoint.endpoint_id, function_id, kwargs)
    except ServiceUnavailableError as error:
        # The endpoint went offline since the status was read: a federated request tries the
        # next cluster (this attempt ends failed, with its reservation settled).
        records.finish(request_id, "failed", error=error.message)
        if cluster is not None:
            raise
        return submit(
            caller, openai_path, raw_body, cluster, framework, exclude | {endpoint.endpoint_id}
        )
    except GatewayError as error:
        records.finish(request_id, "failed", error=error.message)
        raise
    return Submission(
        request_id,
        task_id,
        endpoint,
        route.reason,
        request,
        time.monotonic() + settings.result_wait_seconds,
    )


def remember_task(submission: Submission) -> asyncio.Task[Any]:
    """Write the task id beside the first polls rather than before them: only the reconciler
    needs it, and it looks much later. (A queued request's submitter writes its own.)"""
    if submission.task_id is None:
        return asyncio.create_task(asyncio.sleep(0))
    return asyncio.create_task(
        asyncio.to_thread(records.set_task, submission.request_id, submission.task_id)
    )


async def wait_for_result(submission: Submission) -> results.Result:
    """Poll the results table (consistent reads, adaptive back-off) until the row appears."""
    remembering = remember_task(submission)
    try:
        return await _poll(submission)
    finally:
        await remembering


async def stream_events(submission: Submission) -> AsyncGenerator[bytes, None]:
    """The client's SSE events, relayed from the chunk batches as they land."""
    remembering = remember_task(submission)
    options = getattr(submission.request, "stream_options", None)
    try:
        async for event in streaming.relay(
            submission.request_id,
            include_usage=bool(options and options.include_usage),
            deadline=submission.deadline,
        ):
            yield event
    finally:
        await remembering


async def open_stream(submission: Submission) -> AsyncGenerator[bytes, None]:
    """The client's SSE body, once the stream has begun or `stream_error_wait_seconds` passed.

    A stream that fails before its first token (vLLM refused the request: context length, a
    parameter it does not take) raises that error here, so the client gets the HTTP status
    OpenAI would send (`openai.BadRequestError`) instead of a 200 with an error event. A job
    still queued on its cluster after the wait gets its headers and keep-alives as before.
    """
    events = stream_events(submission)
    first: asyncio.Future[bytes] = asyncio.ensure_future(anext(events))
    await asyncio.wait({first}, timeout=get_settings().stream_error_wait_seconds)
    if first.done() and first.exception() is None:
        error = _error_before_any_token(first.result())
        if error is not None:
            await events.aclose()
            raise error

    async def body() -> AsyncGenerator[bytes, None]:
        try:
            try:
                yield await first
            except StopAsyncIteration:
                return
            async for event in events:
                yield event
        finally:
            if not first.done():  # the client left before the stream began
                first.cancel()
            await events.aclose()

    return body()


def _error_before_any_token(event: bytes) -> GatewayError | None:
    """The stream's first event as an HTTP error, if it is an error event."""
    if not event.startswith(b"data: {"):
        return None
    try:
        data = json.loads(event[len(b"data: ") :])
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) and "choices" not in data else None
    if not isinstance(error, dict):
        return None
    message = str(error.get("message") or "The model backend refused the request.")
    code = error.get("code")
    if code == "compute_timeout":
        return ComputeTimeoutError(message)
    # Stream errors carry no HTTP status, only vLLM's code and OpenAI's type.
    status = code if isinstance(code, int) and 400 <= code < 600 else 502
    if status >= 500 and error.get("type") == "invalid_request_error":
        status = 400
    return backend_error(status, message, error.get("param"))


async def _poll(submission: Submission) -> results.Result:
    started = time.monotonic()
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
    """The body to send back, or the OpenAI-shaped error a failed result stands for."""
    if result.status_code < 400:
        return result.body
    raise backend_error(result.status_code, results.error_message(result.body))


def backend_error(status: int, message: str, param: str | None = None) -> GatewayError:
    """What the client gets when vLLM refused (4xx, passed on) or failed (502) a request."""
    if status < 500:
        refused = InvalidRequestError(message, param=param, code="backend_rejected")
        refused.status = status
        return refused
    return UpstreamError(f"The model backend failed: {message}")
