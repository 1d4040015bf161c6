"""Streamed answers: the stream callback that stores chunk batches, and the relay to the client.

The streaming compute function posts numbered batches of vLLM's SSE `data:` payloads
(`compute_funcs.streaming`). Each batch is written once to `stream_chunks` under
(request id, seq); the proxy's relay queries only the rows after the last one it sent, puts them
in seq order and turns them into the client's SSE. The callback's reply tells the compute
function whether anyone is still listening.

A failed stream's error travels as the last chunk of the done row, `{"error": {...}}`, exactly
the event the client gets, so the relay needs no second read to learn how the stream ended.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from pynamodb.exceptions import DoesNotExist, PutError, UpdateError

from first_core import records
from first_core.callbacks import read_callback
from first_core.errors import (
    ComputeTimeoutError,
    ConflictError,
    GatewayError,
)
from first_core.schemas.wire import StreamBatchBody, StreamUsage
from first_core.settings import get_settings
from first_core.tables import TERMINAL_STATUSES, RequestRecord, StreamChunkBatch
from first_core.usage import Usage, late_usage

# Polling stream_chunks: the pause is a tenth of the time since data last came (at least
# `_MIN_POLL_S`), so a first token or the next batch is seen within milliseconds while an idle,
# queued stream costs about ten reads a second.
_MIN_POLL_S = 0.002
_MAX_POLL_S = 0.1
# While no chunk comes, the request record is read this often, to notice an end elsewhere.
_STATUS_CHECK_S = 1.0


def accept_stream_callback(
    request_id: str, authorization: str | None, raw_body: bytes
) -> dict[str, Any]:
    """The stream callback route: verify, store the batch once, and say whether to go on."""
    # The batch becomes one DynamoDB item, which holds at most 400 KB.
    batch = read_callback(
        request_id,
        authorization,
        raw_body,
        StreamBatchBody,
        get_settings().inline_result_bytes,
    )
    try:
        record = RequestRecord.get(request_id, consistent_read=True)
    except DoesNotExist:
        raise ConflictError(f"Request {request_id} does not exist.") from None

    if record.status == "cancelled":
        # The compute function stops on this reply; its final batch still carries the usage
        # of what was generated, which is billed even though nobody read it.
        if batch.done and batch.usage is not None:
            _record_usage_after_cancel(request_id, batch.usage.to_usage())
        return {"continue": False, "duplicate": False}
    ends_as = "failed" if batch.error else "completed"
    if record.status in TERMINAL_STATUSES and not _ended_by_this_stream(record.status, batch):
        raise ConflictError(f"Request {request_id} has already ended ({record.status}).")

    written = _put_batch(request_id, batch)
    if batch.done:
        # Also after a duplicate put: the first delivery may have died between the two writes.
        usage = batch.usage.to_usage() if batch.usage else None
        error = batch.error.message if batch.error else None
        if batch.seq and _batches_before(request_id, batch.seq) < batch.seq:
            # An earlier batch is missing (late, or lost): the request ends once the gap is
            # filled, by that batch or by the reconciler from the task's result. The mark goes
            # first, so a batch that fills the gap meanwhile sees it (or the count below sees
            # that batch).
            _mark_done_seq(request_id, batch.seq)
            if _batches_before(request_id, batch.seq) < batch.seq:
                return {"continue": True, "duplicate": not written}
        records.finish(request_id, ends_as, usage=usage, error=error)
    elif record.stream_done_seq is not None and record.status not in TERMINAL_STATUSES:
        _finish_if_whole(request_id, int(record.stream_done_seq))
    return {"continue": True, "duplicate": not written}


def _batches_before(request_id: str, seq: int) -> int:
    return int(
        StreamChunkBatch.count(request_id, StreamChunkBatch.seq < seq, consistent_read=True)
    )


def _mark_done_seq(request_id: str, seq: int) -> None:
    try:
        RequestRecord(request_id).update(
            actions=[RequestRecord.stream_done_seq.set(seq)], condition=records.STILL_OPEN
        )
    except UpdateError as failure:
        if failure.cause_response_code != "ConditionalCheckFailedException":
            raise


def _finish_if_whole(request_id: str, done_seq: int) -> None:
    """End a stream whose done batch came early, once no batch before it is missing."""
    if _batches_before(request_id, done_seq) < done_seq:
        return
    try:
        done = StreamChunkBatch.get(request_id, done_seq, consistent_read=True)
    except DoesNotExist:
        return
    error = None
    if done.chunks:
        last = json.loads(done.chunks[-1]) if done.chunks[-1].startswith('{"error"') else None
        if isinstance(last, dict) and isinstance(last.get("error"), dict):
            error = str(last["error"].get("message") or "The stream failed.")
    usage = StreamUsage.model_validate(done.usage).to_usage() if done.usage else None
    records.finish(
        request_id, "failed" if error else "completed", usage=usage, error=error
    )


def _ended_by_this_stream(status: str, batch: StreamBatchBody) -> bool:
    """Whether a batch for an ended request belongs to the stream that ended it."""
    if batch.done:  # a repeated final batch, finding the request ended by its first delivery
        return status == ("failed" if batch.error else "completed")
    if status not in ("completed", "failed"):
        return False
    # A batch overtaken by its own stream's final batch still fills its gap (rare: only when
    # deliveries race), so look for that final batch after it.
    later = StreamChunkBatch.query(
        batch.request_id,
        StreamChunkBatch.seq > batch.seq,
        filter_condition=StreamChunkBatch.done == True,  # noqa: E712 (a pynamodb condition)
        consistent_read=True,
    )
    return any(True for _ in later)


def _put_batch(request_id: str, batch: StreamBatchBody) -> bool:
    """Write the row unless (request_id, seq) exists; False for a repeated batch."""
    chunks = list(batch.chunks)
    if batch.error is not None:
        chunks.append(_compact({"error": batch.error.model_dump()}))
    now = time.time()
    row = StreamChunkBatch(
        request_id,
        batch.seq,
        chunks=chunks,
        done=batch.done,
        usage=batch.usage.model_dump() if batch.done and batch.usage else None,
        created_at=now,
        expires_at=datetime.fromtimestamp(now + get_settings().result_ttl_seconds, tz=UTC),
    )
    try:
        row.save(condition=StreamChunkBatch.seq.does_not_exist())
    except PutError as failure:
        if failure.cause_response_code == "ConditionalCheckFailedException":
            return False
        raise
    return True


def _record_usage_after_cancel(request_id: str, usage: Usage) -> None:
    """Set the usage of a cancelled request once, leaving its status alone (and on its usage
    record, and against its rate-limit windows)."""
    record = RequestRecord(request_id)
    try:
        record.update(
            actions=[
                RequestRecord.prompt_tokens.set(usage.prompt_tokens),
                RequestRecord.completion_tokens.set(usage.completion_tokens),
                RequestRecord.total_tokens.set(usage.total_tokens),
            ],
            condition=(RequestRecord.status == "cancelled")
            & RequestRecord.total_tokens.does_not_exist(),
        )
    except UpdateError as failure:
        if failure.cause_response_code != "ConditionalCheckFailedException":
            raise
        return
    late_usage(record)


def cancel(request_id: str) -> None:
    """The client went away: end the request; the compute function learns it at its next batch."""
    records.finish(request_id, "cancelled")


async def relay(
    request_id: str,
    *,
    include_usage: bool,
    deadline: float,
    keepalive_seconds: float = 15.0,
) -> AsyncIterator[bytes]:
    """The client's SSE body for a streaming request, until its done batch or `deadline`.

    If the relay stops before the stream ended (the client disconnected, the deadline passed),
    the request is cancelled, so the compute function stops generating for nobody.
    """
    last_sent = -1
    held: dict[int, StreamChunkBatch] = {}  # batches that overtook an earlier one
    quiet_since = checked = last_data = time.monotonic()
    ended_elsewhere: RequestRecord | None = None
    finished = False
    try:
        while not finished:
            for row in await asyncio.to_thread(_rows_after, request_id, last_sent):
                held.setdefault(int(row.seq), row)
            events, last_sent, finished = _ready_events(held, last_sent, include_usage)
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
                yield _event(_ended_error(ended_elsewhere))
                break
            if now - quiet_since >= keepalive_seconds:
                yield b": keep-alive\n\n"
                quiet_since = now
            if now >= deadline:
                yield _event(_timeout_error(request_id))
                break
            if now - checked >= _STATUS_CHECK_S:
                # A task that died without a final batch is ended by the reconciler (or the
                # request is cancelled through the API): stop waiting for chunks that never come.
                checked = now
                ended_elsewhere = await asyncio.to_thread(_ended_record, request_id)
            delay = min(max(_MIN_POLL_S, (now - last_data) / 10), _MAX_POLL_S)
            await asyncio.sleep(min(delay, deadline - now))
    finally:
        if not finished:
            # Synchronous on purpose: an await here, in a cancelled task, would be cancelled too.
            cancel(request_id)


def _ready_events(
    held: dict[int, StreamChunkBatch], last_sent: int, include_usage: bool
) -> tuple[list[bytes], int, bool]:
    """The client events of the batches that are next in seq order, the new last seq, and
    whether the stream is over (OpenAI ends a failed stream without `[DONE]`)."""
    events: list[bytes] = []
    while last_sent + 1 in held:
        last_sent += 1
        row = held.pop(last_sent)
        for chunk in row.chunks:
            event, failed = _client_event(chunk, include_usage)
            if event is not None:
                events.append(event)
            if failed:
                return events, last_sent, True
        if row.done:
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
    reason = f": {record.error}" if record.error else "."
    return GatewayError(
        f"Request {record.request_id} ended ({record.status}) before its stream finished{reason}",
        code=f"request_{record.status}",
    ).to_body()


def _rows_after(request_id: str, last_sent: int) -> list[StreamChunkBatch]:
    """Only the rows not sent yet: the range-key condition keeps each poll to the new rows."""
    return list(
        StreamChunkBatch.query(request_id, StreamChunkBatch.seq > last_sent, consistent_read=True)
    )


def _client_event(chunk: str, include_usage: bool) -> tuple[bytes | None, bool]:
    """The SSE event for one stored payload (None to drop it), and whether it is an error."""
    try:
        data = json.loads(chunk)
    except ValueError:
        return None, False
    if not isinstance(data, dict):
        return None, False
    if "error" in data and "choices" not in data:
        return _event(data), True
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


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {_compact(data)}\n\n".encode()


def _compact(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


# ---- the whole answer of a stream, for GET /v1/requests/{id} ------------------------------------


def answer(request_id: str, openai_path: str) -> dict[str, Any]:
    """The non-streamed answer a finished stream adds up to, from its stored chunk batches: what
    a client whose connection dropped reads back later."""
    chunks = [
        chunk
        for row in StreamChunkBatch.query(request_id, consistent_read=True)  # in seq order
        for chunk in row.chunks
    ]
    return assemble(openai_path, chunks)


def assemble(openai_path: str, chunks: list[str]) -> dict[str, Any]:
    """`chat.completion` or `text_completion` from a stream's `data:` payloads.

    compute_funcs/streaming.py assembles the same answer for its return value (it ships alone to
    the clusters and cannot import this); tests/unit/test_streaming_compute.py checks the two
    agree on the mock vLLM's streams.
    """
    chat = openai_path.strip("/").endswith("chat/completions")
    head: dict[str, Any] = {}
    usage: Any = None
    choices: dict[int, dict[str, Any]] = {}
    for text in chunks:
        chunk = json.loads(text)
        if not isinstance(chunk, dict) or ("error" in chunk and "choices" not in chunk):
            continue
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in chunk and key not in head:
                head[key] = chunk[key]
        usage = chunk.get("usage") or usage
        for part in chunk.get("choices") or []:
            _fold(choices.setdefault(part.get("index", 0), _empty_choice()), part, chat)
    out = [_choice_answer(index, choice, chat) for index, choice in sorted(choices.items())]
    kind = "chat.completion" if chat else "text_completion"
    return {**head, "object": kind, "choices": out, "usage": usage}


def _empty_choice() -> dict[str, Any]:
    return {
        "parts": [],
        "reasoning": [],
        "tools": {},
        "role": "assistant",
        "logprobs": None,
        "finish_reason": None,
        "stop_reason": None,
    }


def _fold(choice: dict[str, Any], part: dict[str, Any], chat: bool) -> None:
    """Add one chunk's choice to what the choice holds so far."""
    delta = part.get("delta") or {}
    choice["role"] = delta.get("role") or choice["role"]
    choice["parts"].append((delta.get("content") if chat else part.get("text")) or "")
    choice["reasoning"].append(delta.get("reasoning_content") or "")
    for call in delta.get("tool_calls") or []:
        slot = choice["tools"].setdefault(
            call.get("index", 0),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        slot["id"] = call.get("id") or slot["id"]
        function = call.get("function") or {}
        slot["function"]["name"] += function.get("name") or ""
        slot["function"]["arguments"] += function.get("arguments") or ""
    if isinstance(part.get("logprobs"), dict):
        merged = choice["logprobs"] = choice["logprobs"] or {}
        for key, value in part["logprobs"].items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            else:
                merged[key] = value
    for key in ("finish_reason", "stop_reason"):
        if part.get(key) is not None:
            choice[key] = part[key]


def _choice_answer(index: int, choice: dict[str, Any], chat: bool) -> dict[str, Any]:
    text = "".join(choice["parts"])
    if chat:
        calls = [call for _, call in sorted(choice["tools"].items())]
        message: dict[str, Any] = {"role": choice["role"], "content": text, "tool_calls": calls}
        if any(choice["reasoning"]):
            message["reasoning_content"] = "".join(choice["reasoning"])
        content: dict[str, Any] = {"message": message}
    else:
        content = {"text": text}
    return {
        "index": index,
        **content,
        "logprobs": choice["logprobs"],
        "finish_reason": choice["finish_reason"],
        "stop_reason": choice["stop_reason"],
    }
