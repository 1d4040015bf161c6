"""A streamed answer on its way to the client: the stream chunks relayed as OpenAI's SSE.

The relay queries only the rows after the last one it sent, puts them in seq order and turns them
into the client's events, with keep-alive comments while the job is queued and `[DONE]` at the
end. If the client goes away first, the request is cancelled (first_core.inference.stream_sink),
so the compute function stops generating for nobody.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from pynamodb.exceptions import DoesNotExist

from first_core.errors import (
    ComputeTimeoutError,
    GatewayError,
    anthropic_body,
    anthropic_status,
    public_message,
)
from first_core.inference.stream_sink import cancel, compact
from first_core.inference.submit import Submission
from first_core.inference.wait import backend_error, forget_task, remember_task
from first_core.schemas.apis import MessagesRequest, ResponsesRequest
from first_core.schemas.wire import chunk_error
from first_core.settings import get_settings
from first_core.tables import TERMINAL_STATUSES, RequestRecord, StreamChunkBatch

# Polling stream_chunks: the pause is a tenth of the time since data last came (at least
# `_MIN_POLL_S`), so a first token or the next batch is seen within milliseconds while an idle,
# queued stream costs about ten reads a second.
_MIN_POLL_S = 0.002
_MAX_POLL_S = 0.1
# Before the first batch: no batch comes back sooner than this after the submit (the task's
# trip through Globus Compute and the engine, vLLM's first token, the callback's write), and
# until one has come the polls are at least `_FIRST_MIN_POLL_S` apart: the queries that would
# always miss are not made.
_FIRST_POLL_S = 0.010
_FIRST_MIN_POLL_S = 0.005
# While no chunk comes, the request record is read this often, to notice an end elsewhere.
_STATUS_CHECK_S = 1.0


async def stream_events(submission: Submission) -> AsyncGenerator[bytes, None]:
    """The client's SSE events, relayed from the chunk batches as they land."""
    remembering = remember_task(submission)
    named = named_events(submission)
    options = getattr(submission.request, "stream_options", None)
    try:
        async for event in relay(
            submission.request_id,
            include_usage=bool(options and not named and options.include_usage),
            continuous_usage=bool(options and options.continuous_usage_stats),
            deadline=submission.deadline,
            named=named,
        ):
            yield event
    finally:
        await forget_task(remembering)


def named_events(submission: Submission) -> str | None:
    """The route whose stream is named events (`event: <type>` before each `data:`, no
    `[DONE]`): "responses" or "messages"; None for chat and text completions."""
    if isinstance(submission.request, ResponsesRequest):
        return "responses"
    return "messages" if isinstance(submission.request, MessagesRequest) else None


async def open_stream(submission: Submission) -> AsyncGenerator[bytes, None]:
    """The client's SSE body, once the stream has begun or `stream_error_wait_seconds` passed.

    A stream that fails before its first token (vLLM refused the request: context length, a
    parameter it does not take) raises that error here, so the client gets the HTTP status
    OpenAI would send (`openai.BadRequestError`) instead of a 200 with an error event. A job
    still queued on its cluster after the wait gets its headers and keep-alives as before.
    """
    events = stream_events(submission)
    first: asyncio.Future[bytes] = asyncio.ensure_future(anext(events))
    try:
        await asyncio.wait({first}, timeout=get_settings().stream_error_wait_seconds)
    except asyncio.CancelledError:  # the client left before the stream began: stop relaying
        first.cancel()
        raise
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
    if event.startswith(b"event: "):  # a named event: its data is on the next line
        event = event.partition(b"\n")[2]
    if not event.startswith(b"data: {"):
        return None
    error = chunk_error(event[len(b"data: ") :].decode(errors="replace"))
    if error is None:
        return None
    message = str(error.get("message") or "The model backend refused the request.")
    code = error.get("code", anthropic_status(error.get("type")))
    if code == "compute_timeout":
        return ComputeTimeoutError(message)
    # Stream errors carry no HTTP status, only vLLM's code and OpenAI's type.
    status = code if isinstance(code, int) and 400 <= code < 600 else 502
    if status >= 500 and error.get("type") == "invalid_request_error":
        status = 400
    return backend_error(status, message, error.get("param"))


async def relay(
    request_id: str,
    *,
    include_usage: bool,
    deadline: float,
    keepalive_seconds: float = 15.0,
    continuous_usage: bool = False,
    named: str | None = None,
) -> AsyncIterator[bytes]:
    """The client's SSE body for a streaming request, until its done batch or `deadline`;
    `named`, the Responses or Messages route, whose events are named (`named_events`).

    If the relay stops before the stream ended (the client disconnected, the deadline passed),
    the request is cancelled, so the compute function stops generating for nobody.
    """
    last_sent = -1
    held: dict[int, StreamChunkBatch] = {}  # batches that overtook an earlier one
    quiet_since = checked = last_data = time.monotonic()
    ended_elsewhere: RequestRecord | None = None
    finished = False
    try:
        await asyncio.sleep(_FIRST_POLL_S)
        while not finished:
            for row in await asyncio.to_thread(_rows_after, request_id, last_sent):
                held.setdefault(int(row.seq), row)
            events, last_sent, finished = _ready_events(
                held, last_sent, include_usage, continuous_usage, named
            )
            for event in events:
                yield event
            now = time.monotonic()
            if finished:
                break
            if events:
                quiet_since = last_data = now
                continue
            if ended_elsewhere is not None:
                # The done row is written before the record ends, so this poll would have seen it.
                finished = True
                yield _event(_ended_error(ended_elsewhere), named)
                break
            if now - quiet_since >= keepalive_seconds:
                yield b": keep-alive\n\n"
                quiet_since = now
            if now >= deadline:
                yield _event(_timeout_error(request_id), named)
                break
            if now - checked >= _STATUS_CHECK_S:
                # A task that died without a final batch is ended by the reconciler (or the
                # request is cancelled through the API): stop waiting for chunks that never come.
                checked = now
                ended_elsewhere = await asyncio.to_thread(_ended_record, request_id)
            least = _FIRST_MIN_POLL_S if last_sent < 0 else _MIN_POLL_S
            delay = min(max(least, (now - last_data) / 10), _MAX_POLL_S)
            await asyncio.sleep(min(delay, deadline - now))
    finally:
        if not finished:
            # Synchronous on purpose: an await here, in a cancelled task, would be cancelled too.
            cancel(request_id)


def _ready_events(
    held: dict[int, StreamChunkBatch],
    last_sent: int,
    include_usage: bool,
    continuous_usage: bool = False,
    named: str | None = None,
) -> tuple[list[bytes], int, bool]:
    """The client events of the batches that are next in seq order, the new last seq, and
    whether the stream is over (OpenAI ends a failed stream without `[DONE]`; named-event
    streams end with their terminal event, never `[DONE]`)."""
    events: list[bytes] = []
    while last_sent + 1 in held:
        last_sent += 1
        row = held.pop(last_sent)
        for chunk in row.chunks:
            event, failed = _client_event(chunk, include_usage, continuous_usage, named)
            if event is not None:
                events.append(event)
            if failed:
                return events, last_sent, True
        if row.done:
            if named is None:
                events.append(b"data: [DONE]\n\n")
            return events, last_sent, True
    return events, last_sent, False


def _ended_record(request_id: str) -> RequestRecord | None:
    try:
        record = RequestRecord.get(request_id, consistent_read=True)
    except DoesNotExist:
        return None
    return record if record.status in TERMINAL_STATUSES else None


def _ended_error(record: RequestRecord) -> dict[str, Any]:
    if record.status == "timed_out":
        return _timeout_error(record.request_id)
    reason = f": {public_message(record.error)}" if record.error else "."
    return GatewayError(
        f"Request {record.request_id} ended ({record.status}) before its stream finished{reason}",
        code=f"request_{record.status}",
    ).to_body()


def _rows_after(request_id: str, last_sent: int) -> list[StreamChunkBatch]:
    """Only the rows not sent yet: the range-key condition keeps each poll to the new rows."""
    return list(
        StreamChunkBatch.query(request_id, StreamChunkBatch.seq > last_sent, consistent_read=True)
    )


def _client_event(
    chunk: str, include_usage: bool, continuous_usage: bool = False, named: str | None = None
) -> tuple[bytes | None, bool]:
    """The SSE event for one stored payload (None to drop it), and whether it is an error."""
    try:
        data = json.loads(chunk)
    except ValueError:
        return None, False
    if not isinstance(data, dict):
        return None, False
    error = chunk_error(data)
    if error is not None:
        # The cluster's words may name its exception classes or vLLM's address: not for clients.
        message = public_message(str(error.get("message") or ""), "The stream failed.")
        return _event({**data, "error": {**error, "message": message}}, named), True
    if named is not None:
        return _event_named(data.get("type"), chunk), False
    running = data.get("choices") and data.get("usage") is not None
    if running and not (include_usage and continuous_usage):
        # vLLM was asked for the running usage on every chunk (so a cancelled stream is billed
        # its prompt too); a client that was not gets these chunks as OpenAI sends them.
        data["usage"] = None
        if include_usage:
            return _event(data), False
    if not include_usage:
        # vLLM was always asked for usage; a client that was not gets what OpenAI would send it.
        if data.get("choices") == [] and data.get("usage") is not None:
            return None, False
        if "usage" in data and data["usage"] is None:
            del data["usage"]
            return _event(data), False
    return f"data: {chunk}\n\n".encode(), False


def _timeout_error(request_id: str) -> dict[str, Any]:
    return ComputeTimeoutError(
        f"The cluster did not finish streaming request {request_id} in time; it was cancelled."
    ).to_body()


def _event(data: dict[str, Any], named: str | None = None) -> bytes:
    """One SSE event; on a named-event route an error is `event: error` (Anthropic's shape on
    the Messages route, which its SDK raises)."""
    if named is None:
        return f"data: {compact(data)}\n\n".encode()
    error = chunk_error(data)
    if error is not None and named == "messages":
        code = error.get("code")
        status = code if isinstance(code, int) and 400 <= code < 600 else 500
        data = anthropic_body(status, data)
    return _event_named("error" if error is not None else data.get("type"), compact(data))


def _event_named(kind: Any, data: str) -> bytes:
    name = f"event: {kind}\n" if isinstance(kind, str) and kind and "\n" not in kind else ""
    return f"{name}data: {data}\n\n".encode()
