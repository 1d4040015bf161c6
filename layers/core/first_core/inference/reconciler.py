"""The reconciler: a lost callback costs latency, never an answer.

Run on a schedule (the `reconciler` function in app.py; the local stack runs it in a thread).
It reads the open requests (the `by_open_status` index holds only requests not yet ended) older
than a grace period and asks the compute backend for their tasks' states in bulk (a hundred per
Globus Compute call, at background priority of the API budget: first_core.compute.budget):

- `success`: the task's return value is written through the callback's own idempotent path
  (`results.record` for a non-streamed request; for a streamed one the missing chunk batches are
  put with the stream callback's conditional put, in seq order, and the record ends);
  the value is checked as a callback is (first_core.callbacks): a status or usage out of range,
  or an answer over the cap, ends the request `failed` with the reason instead;
- `failed`, `unknown` (the task vanished), or no task id at all: the request ends `failed` with
  the reason, through the same path (so a client still waiting gets the error at once);
- `pending`: left alone, unless the request is past its deadline, when it ends `timed_out`;
- no task id yet because it waits in the submit queue, or because its submitter stopped between
  sending its batch and writing the task ids: the tasks of that batch's task group are matched
  to their requests by the request id their return values carry (first_core.inference.queue).

Every end goes through `records.finish`, which is conditional: a request ends exactly once, so a
callback racing the reconciler changes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError

from first_core.callbacks import check_bounds
from first_core.compute import ComputeBackend, TaskState, background_lookup, get_backend
from first_core.errors import InvalidRequestError, public_message
from first_core.inference import records, results, stream_sink
from first_core.schemas import wire
from first_core.settings import get_settings
from first_core.tables import RequestRecord, StreamChunkBatch

log = logging.getLogger("first.reconciler")


@dataclass
class ReconcileReport:
    """What one reconcile run did, request ids by outcome."""

    checked: int = 0
    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Left for the next run: the API budget had nothing for background work.
    deferred: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def reconcile(
    now: float | None = None,
    grace_seconds: float | None = None,
    backend: ComputeBackend | None = None,
) -> ReconcileReport:
    """Settle every request still open after the grace period from what Globus Compute knows of its
    task: a finished task's result is written as its callback would have, a failed or vanished task
    fails the request, and one past the deadline times out. Each request ends once, however often
    this runs or races a late callback; the lookups take what the users' requests leave of the API
    budget (deferred when none is left)."""
    settings = get_settings()
    now = time.time() if now is None else now
    grace = settings.reconcile_grace_seconds if grace_seconds is None else grace_seconds
    report = ReconcileReport()
    stale = list(
        RequestRecord.by_open_status.query("open", RequestRecord.created_at <= now - grace)
    )
    if not stale:
        return report
    backend = backend or get_backend()

    def look_up() -> dict[str, TaskState]:
        states = backend.task_states([r.task_id for r in stale if r.task_id])
        return states | _found_in_batches(stale, now, backend)

    # Background work: it takes what the users' requests leave of the API budget.
    states = background_lookup(look_up, report.errors)
    if states is None:
        report.deferred = len(stale)
        return report
    for record in stale:
        report.checked += 1
        try:
            _reconcile_one(record, now, states, report)
        except Exception as error:  # one bad request must not stop the others
            log.exception("could not reconcile %s", record.request_id)
            report.errors.append(f"{record.request_id}: {type(error).__name__}: {error}")
    return report


def _found_in_batches(
    stale: list[RequestRecord], now: float, backend: ComputeBackend
) -> dict[str, TaskState]:
    """Task ids a submitter sent but did not live to write: the tasks of its batch's task
    group, matched to their requests by the request id each task returns (finished ones only;
    the others are looked for again next time). Keyed by the task id now on the record."""
    batches = {
        r.batch_id for r in stale if r.batch_id and not r.task_id and records.claim_is_stale(r, now)
    }
    found: dict[str, TaskState] = {}
    for batch_id in sorted(batches):
        task_ids = backend.task_group(batch_id) or []
        for task_id, state in backend.task_states(task_ids).items():
            request_id = state.result.get("request_id") if isinstance(state.result, dict) else None
            if request_id and records.set_task(request_id, task_id, batch_id=batch_id):
                found[task_id] = state
                for record in stale:
                    if record.request_id == request_id:
                        record.task_id = task_id
    return found


def _reconcile_one(
    record: RequestRecord, now: float, states: dict[str, TaskState], report: ReconcileReport
) -> None:
    request_id = record.request_id
    settings = get_settings()
    if not record.task_id:
        waiting = record.queued_at is not None or record.batch_id is not None
        if waiting and now - float(record.created_at) > settings.request_deadline_seconds:
            if records.finish(request_id, "timed_out", error="It was never sent to a cluster."):
                report.timed_out.append(request_id)
            return
        # Queued for the submitter, or sent by one that stopped before writing the task id; or
        # the proxy's task-id write (beside its first polls, throttled maybe) is still to land:
        # "never submitted" is certain only once the proxy's own wait is over.
        if waiting or now - float(record.created_at) < settings.result_wait_seconds:
            report.pending.append(request_id)
            return
        _fail(record, "The request was never submitted to a compute endpoint.", report)
        return
    state = states.get(record.task_id, TaskState("unknown", error="not looked up"))
    if state.status == "success":
        value = state.result if isinstance(state.result, dict) else {}
        if _write_result(record, value):
            report.completed.append(request_id)
        else:
            report.failed.append(request_id)
    elif state.status == "failed":
        _fail(record, f"The compute task failed: {state.error or 'no reason given'}", report)
    elif state.status == "unknown":
        _fail(record, f"The compute task vanished: {state.error or 'unknown task'}", report)
    elif now - float(record.created_at) > settings.request_deadline_seconds:
        if records.finish(
            request_id, "timed_out", error="The compute task did not finish before the deadline."
        ):
            report.timed_out.append(request_id)
    else:
        report.pending.append(request_id)


def _error_body(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


def _fail(record: RequestRecord, message: str, report: ReconcileReport) -> None:
    # The reason may be an exception line from the cluster: whole in the log, in the client's
    # words in the answer.
    log.warning("request failed: %s", message, extra={"request_id": record.request_id})
    _end_failed(record, 502, _error_body(public_message(message), "compute_failed"))
    report.failed.append(record.request_id)


def _end_failed(record: RequestRecord, status_code: int, body: dict[str, Any]) -> None:
    """End the request failed with this OpenAI-shaped error, as its callback would have."""
    if record.stream:
        _end_stream(record.request_id, [], status_code, body, None)
    else:
        results.record(record.request_id, status_code, body)


def _write_result(record: RequestRecord, value: dict[str, Any]) -> bool:
    """Write a finished task's return value as its callback would have; True if it succeeded.

    It is checked as a callback is (first_core.callbacks): a status or usage out of range, or
    an answer over the cap, ends the request failed with the reason instead."""
    try:
        checked = wire.CallbackBody.model_validate(
            {"request_id": record.request_id, "status_code": value.get("status_code") or 500}
        )
    except ValidationError as error:
        return _refuse(record, results.validation_problem(error, "result"))
    status_code = checked.status_code
    body = value.get("body")
    if status_code >= 400 and not (isinstance(body, dict) and "error" in body):
        body = _error_body(results.error_message(body), "upstream_error")
    if not record.stream:
        problem = results.answer_problem(record.request_id, status_code, body, record)
        if problem is not None:
            return _refuse(record, problem)
        size = len(json.dumps(body, separators=(",", ":")))
        if size > get_settings().max_payload_bytes:
            results.record(record.request_id, *results.too_large(size))
            return False
        results.record(record.request_id, status_code, body)
        return status_code < 400
    chunks = [str(c) for c in value.get("chunks") or []]
    usage = value.get("usage") if isinstance(value.get("usage"), dict) else None
    try:
        stream_usage = wire.StreamUsage.model_validate(usage) if usage is not None else None
        check_bounds(record, usage=stream_usage.to_usage() if stream_usage else None)
    except ValidationError as error:
        return _refuse(record, results.validation_problem(error, "usage"))
    except InvalidRequestError as error:
        return _refuse(record, error.message)
    size = sum(len(chunk) for chunk in chunks)
    if size > get_settings().max_payload_bytes:
        _end_stream(record.request_id, [], *results.too_large(size), None)
        return False
    _end_stream(record.request_id, chunks, status_code, body, usage)
    return status_code < 400


def _refuse(record: RequestRecord, problem: str) -> bool:
    """A task's return value out of range: the request ends failed, saying why."""
    message = f"The compute task returned an answer the gateway cannot use: {problem}"
    _end_failed(record, 502, _error_body(message, "invalid_result"))
    return False


def _end_stream(
    request_id: str,
    chunks: list[str],
    status_code: int,
    body: Any,
    usage: Any,
) -> None:
    """Fill the gaps of a stream from the task's whole list of chunks, then its done batch.

    Batches already stored keep their place; a lost batch's chunks are those between the end
    of the stored batch before it and the start of the stored batch after it. Each batch is put
    with the stream callback's conditional put, so a batch that lands meanwhile wins.
    """
    error = None
    if status_code >= 400:
        raw = body.get("error") if isinstance(body, dict) else None
        error = wire.StreamError.model_validate(
            raw if isinstance(raw, dict) else {"message": results.error_message(body)}
        )
    stream_usage = wire.StreamUsage.model_validate(usage) if isinstance(usage, dict) else None
    stored = list(StreamChunkBatch.query(request_id, consistent_read=True))
    position, next_seq, done = 0, 0, False
    for row in sorted(stored, key=lambda r: int(r.seq)):
        seq = int(row.seq)
        row_chunks = [c for c in row.chunks if wire.chunk_error(c) is None]
        if seq > next_seq:
            start = _find(chunks, row_chunks, position)
            _put(request_id, next_seq, chunks[position:start])
            for empty in range(next_seq + 1, seq):
                _put(request_id, empty, [])
            position = start
        position += len(row_chunks)
        next_seq = seq + 1
        if row.done:  # the stream's own end is stored (its callback died before ending it)
            done = True
            break
    if not done:
        # The rest, in batches that each fit in one item (all of a stream's batches may have
        # been lost); the last is the done batch.
        *before_done, last = _pieces(chunks[position:], get_settings().inline_result_bytes)
        for piece in before_done:
            _put(request_id, next_seq, piece)
            next_seq += 1
        batch = wire.StreamBatchBody(
            request_id=request_id,
            seq=next_seq,
            chunks=last,
            done=True,
            error=error,
            usage=stream_usage,
        )
        stream_sink.put_batch(request_id, batch)
    records.finish(
        request_id,
        "failed" if error else "completed",
        usage=stream_usage.to_usage() if stream_usage else None,
        error=error.message if error else None,
    )


def _put(request_id: str, seq: int, chunks: list[str]) -> None:
    batch = wire.StreamBatchBody(request_id=request_id, seq=seq, chunks=chunks)
    stream_sink.put_batch(request_id, batch)


def _pieces(chunks: list[str], budget: int) -> list[list[str]]:
    """The chunks in consecutive pieces of at most `budget` bytes as stored (one piece at least;
    a chunk larger than the budget alone)."""
    pieces: list[list[str]] = [[]]
    size = 0
    for chunk in chunks:
        length = len(json.dumps(chunk, ensure_ascii=False)) + 2
        if pieces[-1] and size + length > budget:
            pieces.append([])
            size = 0
        pieces[-1].append(chunk)
        size += length
    return pieces


def _find(chunks: list[str], part: list[str], start: int) -> int:
    """Where `part` begins in `chunks`, at or after `start` (at `start` if it cannot be found)."""
    if not part:
        return start
    for index in range(start, len(chunks) - len(part) + 1):
        if chunks[index : index + len(part)] == part:
            return index
    return start

