"""The stream callback: where the streaming compute function's numbered chunk batches land.

The streaming compute function posts numbered batches of vLLM's SSE `data:` payloads
(`compute_funcs.streaming`). Each batch is written once to `stream_chunks` under
(request id, seq), a repeat changes nothing, and the done batch ends the request once the batches
before it are all there. The callback's reply tells the compute function whether anyone is
still listening (`cancel` is how the relay says no one is). A batch beyond what the backend could
have produced for the request (its `seq`, its usage: first_core.callbacks) is a 400, and a done
batch for a stream that has ended, but the repeat of the one that ended it, a 409: neither
changes the answer.

A failed stream's error travels as the last chunk of the done row, `{"error": {...}}`, exactly
the event the client gets, so the relay needs no second read to learn how the stream ended.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from pynamodb.exceptions import DoesNotExist

from first_core.callbacks import check_bounds, read_callback
from first_core.errors import ConflictError
from first_core.inference import records
from first_core.schemas.wire import StreamBatchBody, StreamUsage, chunk_error
from first_core.settings import get_settings
from first_core.tables import (
    TERMINAL_STATUSES,
    RequestRecord,
    StreamChunkBatch,
    put_once,
    update_if,
)


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
    # Within what the backend could have produced, or a 400 that changes nothing.
    check_bounds(record, usage=batch.usage.to_usage() if batch.usage else None, seq=batch.seq)

    if record.status == "cancelled":
        # The compute function stops on this reply; its final batch still carries the usage
        # of what was generated, which is billed even though nobody read it.
        if batch.done and batch.usage is not None:
            records.bill_after_cancel(request_id, batch.usage.to_usage())
        return {"continue": False, "duplicate": False}
    ends_as = "failed" if batch.error else "completed"
    if record.status in TERMINAL_STATUSES and not _ended_by_this_stream(record.status, batch):
        raise ConflictError(f"Request {request_id} has already ended ({record.status}).")

    put_at = time.time()
    written = put_batch(request_id, batch)
    if batch.done:
        # Also after a duplicate put: the first delivery may have died between the two writes.
        usage = batch.usage.to_usage() if batch.usage else None
        error = batch.error.message if batch.error else None
        # When the first batch came (for the usage record): this one, or read with the count.
        first_at: float | None = put_at if batch.seq == 0 and written else None
        if batch.seq:
            before, first_at = _batches_before(request_id, batch.seq)
            if before < batch.seq:
                # An earlier batch is missing (late, or lost): the request ends once the gap
                # is filled, by that batch or by the reconciler from the task's result. The
                # mark goes first, so a batch that fills the gap meanwhile sees it (or the
                # count below sees that batch).
                _mark_done_seq(request_id, batch.seq)
                before, first_at = _batches_before(request_id, batch.seq)
                if before < batch.seq:
                    return {"continue": True, "duplicate": not written}
        records.finish(request_id, ends_as, usage=usage, error=error, first_contact=first_at)
    elif record.stream_done_seq is not None and record.status not in TERMINAL_STATUSES:
        _finish_if_whole(request_id, int(record.stream_done_seq))
    return {"continue": True, "duplicate": not written}


def _batches_before(request_id: str, seq: int) -> tuple[int, float | None]:
    """How many batches are stored before `seq`, and when the first (seq 0) was: one query,
    of only those two attributes."""
    count, first_at = 0, None
    for row in StreamChunkBatch.query(
        request_id,
        StreamChunkBatch.seq < seq,
        consistent_read=True,
        attributes_to_get=["seq", "created_at"],
    ):
        count += 1
        if int(row.seq) == 0:
            first_at = float(row.created_at)
    return count, first_at


def _mark_done_seq(request_id: str, seq: int) -> None:
    update_if(
        RequestRecord(request_id), [RequestRecord.stream_done_seq.set(seq)], records.STILL_OPEN
    )


def _finish_if_whole(request_id: str, done_seq: int) -> None:
    """End a stream whose done batch came early, once no batch before it is missing."""
    before, first_at = _batches_before(request_id, done_seq)
    if before < done_seq:
        return
    try:
        done = StreamChunkBatch.get(request_id, done_seq, consistent_read=True)
    except DoesNotExist:
        return
    failure = chunk_error(done.chunks[-1]) if done.chunks else None
    error = str(failure.get("message") or "The stream failed.") if failure is not None else None
    usage = StreamUsage.model_validate(done.usage).to_usage() if done.usage else None
    records.finish(
        request_id,
        "failed" if error else "completed",
        usage=usage,
        error=error,
        first_contact=first_at,
    )


def _ended_by_this_stream(status: str, batch: StreamBatchBody) -> bool:
    """Whether a batch for an ended request belongs to the stream that ended it."""
    if status not in ("completed", "failed"):
        return False
    if batch.done:
        # Only a repeat of the final batch that ended it (found stored at its seq): any other
        # final batch came after the end, and must not add to the answer.
        try:
            stored = StreamChunkBatch.get(
                batch.request_id, batch.seq, consistent_read=True, attributes_to_get=["done"]
            )
        except DoesNotExist:
            return False
        return bool(stored.done)
    # A batch overtaken by its own stream's final batch still fills its gap (rare: only when
    # deliveries race), so look for that final batch after it.
    later = StreamChunkBatch.query(
        batch.request_id,
        StreamChunkBatch.seq > batch.seq,
        filter_condition=StreamChunkBatch.done == True,  # noqa: E712 (a pynamodb condition)
        consistent_read=True,
    )
    return any(True for _ in later)


def put_batch(request_id: str, batch: StreamBatchBody) -> bool:
    """Write the row unless (request_id, seq) exists; False for a repeated batch."""
    chunks = list(batch.chunks)
    if batch.error is not None:
        chunks.append(compact({"error": batch.error.model_dump()}))
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
    return put_once(row, StreamChunkBatch.seq.does_not_exist())


def cancel(request_id: str) -> bool:
    """The client went away: end the request (False if it had ended); the compute function
    learns it at its next batch, or finds it ended when it calls back."""
    return records.finish(request_id, "cancelled")


def compact(data: dict[str, Any]) -> str:
    """JSON without spaces, as the chunks are stored and relayed."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)
