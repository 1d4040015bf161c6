"""Requests waiting for Globus Compute's API budget, and the submitter that sends them in batches.

When the budget (compute/budget.py) has no unit for a request, the proxy writes its record as
usual (`queued_at` set) and puts one message on the submit queue (SQS): the request id, the
endpoint and function, and the body to run. Secrets never go on the queue: the submitter
derives the callback URL and token from the request id, as the proxy would have.

The submitter (`submit_waiting`; on AWS a function fed by the queue with a batching window, on
the local stack a thread) takes what arrived together, groups it by endpoint and sends each
group as ONE Globus Compute batch: one API call however many requests. For each group:

1. claim every request for a new batch id (a conditional update: a request no one else holds,
   not sent, not ended). A request another submitter claimed is left to it: no request runs
   twice, whatever SQS redelivers;
2. `batch_run` with the batch id as the task group's id;
3. write each task id back (conditional on the claim).

A message is let go only once its request was sent, ended, or is known to be in a batch that
Globus Compute received. If a submitter dies after claiming, its messages come back (SQS
redelivers what was not deleted); once the claim is older than `submit_claim_seconds`, the next
submitter asks Globus Compute for the dead batch's task group: none means it never arrived, so
this submitter takes the request over and sends it; a group means its tasks run and call back
as usual (the reconciler then finds each task by the request id in its return value). A body
too large for a message (`MESSAGE_INLINE_BYTES`) waits in the results bucket under `queued/`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import Any

from first_core import callbacks, storage
from first_core.compute import ComputeBackend, SubmitRefused, budget, get_backend
from first_core.errors import ServiceUnavailableError
from first_core.inference import records, results
from first_core.settings import get_settings
from first_core.tables import RequestRecord

log = logging.getLogger("first.submitter")

# SQS takes messages up to 256 KiB; larger bodies go to S3 and the message names them.
MESSAGE_INLINE_BYTES = 200_000


@dataclass(frozen=True)
class QueuedRequest:
    """A request waiting in the submit queue, as one SQS message; the payload spills to S3 when it
    is too large for a message."""

    request_id: str
    endpoint_id: str
    function_id: str
    openai_path: str
    stream: bool
    payload: dict[str, Any] | None = None
    payload_key: str | None = None
    fitted_max_tokens: bool = False

    def to_message(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_message(cls, body: str) -> QueuedRequest:
        return cls(**json.loads(body))

    def task_kwargs(self) -> dict[str, Any]:
        payload = self.payload
        if payload is None and self.payload_key is not None:
            payload = json.loads(storage.get(self.payload_key))
        return task_kwargs(
            self.request_id, self.openai_path, self.stream, payload or {}, self.fitted_max_tokens
        )


def task_kwargs(
    request_id: str,
    openai_path: str,
    stream: bool,
    payload: dict[str, Any],
    fitted_max_tokens: bool = False,
) -> dict[str, Any]:
    """What the inference and streaming compute functions are called with. `fitted_max_tokens`:
    the gateway chose the payload's max_tokens (the caller named none), so the function may
    lower it to what the model's context has room for."""
    kwargs: dict[str, Any] = {
        "payload": payload,
        "openai_path": openai_path,
        "request_id": request_id,
        "callback_url": callbacks.callback_url(request_id, "stream" if stream else "result"),
        "callback_token": callbacks.callback_token(request_id),
    }
    if fitted_max_tokens:
        kwargs["fitted_max_tokens"] = True
    return kwargs


@lru_cache(maxsize=1)
def sqs() -> Any:
    """The SQS client (one per process)."""
    import boto3

    s = get_settings()
    return boto3.client("sqs", region_name=s.aws_region, endpoint_url=s.aws_endpoint_url)


def enqueue(request: QueuedRequest) -> None:
    """Put a request on the submit queue (its body in S3 if too large for a message)."""
    body = request.to_message()
    if len(body.encode()) > MESSAGE_INLINE_BYTES:
        key = f"queued/{request.request_id}.json"
        storage.put(key, json.dumps(request.payload).encode())
        body = replace(request, payload=None, payload_key=key).to_message()
    sqs().send_message(QueueUrl=get_settings().submit_queue_url, MessageBody=body)


# ---- the submitter ------------------------------------------------------------------------------


@dataclass
class SubmitReport:
    """What one submitter run did with its messages, by request id."""

    submitted: list[str] = field(default_factory=list)
    # Held by another submitter, already sent, or ended: nothing to do.
    skipped: list[str] = field(default_factory=list)
    # Refused by Globus Compute: ended failed with the reason.
    failed: list[str] = field(default_factory=list)
    # Messages to deliver again later (no budget now, or the send's outcome is unknown).
    retry: list[str] = field(default_factory=list)
    calls: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def submit_waiting(
    messages: dict[str, str],
    backend: ComputeBackend | None = None,
    after_send: Callable[[list[str]], None] | None = None,
) -> SubmitReport:
    """Send queued requests, one Globus Compute batch per endpoint.

    `messages`: message id → body. The report's `retry` names the message ids to deliver again.
    `after_send(request_ids)` runs between the send and the task-id writes (the local stack's
    fault injection kills the submitter there)."""
    report = SubmitReport()
    groups: dict[str, list[tuple[str, QueuedRequest]]] = {}
    for message_id, body in messages.items():
        request = QueuedRequest.from_message(body)
        groups.setdefault(request.endpoint_id, []).append((message_id, request))
    for endpoint_id, group in groups.items():
        _send_group(endpoint_id, group, backend or get_backend(), report, after_send)
    return report


def _send_group(
    endpoint_id: str,
    group: list[tuple[str, QueuedRequest]],
    backend: ComputeBackend,
    report: SubmitReport,
    after_send: Callable[[list[str]], None] | None,
) -> None:
    batch_id = str(uuid.uuid4())
    claimed = []
    # Whether each stale batch reached Globus Compute: a dead submitter's requests come back
    # together, and one look at its task group answers for all of them.
    reached: dict[str, bool] = {}
    with budget.priority(budget.Priority.SUBMITTER):
        for message_id, request in group:
            outcome = _claim(request.request_id, batch_id, backend, reached)
            if outcome == "claimed":
                claimed.append((message_id, request))
            elif outcome == "later":
                report.retry.append(message_id)
            else:
                report.skipped.append(request.request_id)
        if not claimed:
            return
        tasks = [(r.function_id, r.task_kwargs()) for _, r in claimed]
        try:
            task_ids = backend.submit_batch(endpoint_id, tasks, task_group_id=batch_id)
        except budget.BudgetExhausted:
            _release(claimed, batch_id, report)  # nothing was sent: send them later
            return
        except SubmitRefused as refused:
            for _, request in claimed:  # nothing was created; the client gets the reason
                _fail(request, refused.message)
                report.failed.append(request.request_id)
            return
        except Exception:
            # Sent or not, nobody knows: the claims stay until they are stale, when the next
            # delivery asks Globus Compute for the task group before sending anything again.
            log.exception("batch %s to %s: outcome unknown", batch_id, endpoint_id)
            report.retry.extend(message_id for message_id, _ in claimed)
            return
    report.calls += 1
    if after_send is not None:
        after_send([r.request_id for _, r in claimed])
    for (_, request), task_id in zip(claimed, task_ids, strict=True):
        records.set_task(request.request_id, task_id, batch_id=batch_id)
        report.submitted.append(request.request_id)


def _claim(
    request_id: str, batch_id: str, backend: ComputeBackend, reached: dict[str, bool]
) -> str:
    """"claimed" (this batch sends it), "done" (sent, ended, or gone: nothing to do) or "later"
    (another submitter holds it and may still be sending it)."""
    if records.claim(request_id, batch_id):
        return "claimed"
    try:
        record = RequestRecord.get(request_id, consistent_read=True)
    except RequestRecord.DoesNotExist:
        return "done"
    if record.task_id or not record.open_status or not record.batch_id:
        return "done"
    if not records.claim_is_stale(record, time.time()):
        return "later"
    # The submitter that claimed it stopped: if its batch never reached Globus Compute, this
    # one sends the request; if it did, the tasks run and call back as usual.
    stale_batch = record.batch_id
    if stale_batch not in reached:
        reached[stale_batch] = backend.task_group(stale_batch) is not None
    if reached[stale_batch]:
        return "done"
    return "claimed" if records.take_over(request_id, record.batch_id, batch_id) else "later"


def _release(
    claimed: list[tuple[str, QueuedRequest]], batch_id: str, report: SubmitReport
) -> None:
    for message_id, request in claimed:
        records.release(request.request_id, batch_id)
        report.retry.append(message_id)


def _fail(request: QueuedRequest, message: str) -> None:
    """End a request Globus Compute refused: a waiting client gets the error (a stream's relay
    sees its record end and sends it as the last event)."""
    message = f"The request could not be submitted: {message}"
    if request.stream:
        records.finish(request.request_id, "failed", error=message)
    else:
        results.record(request.request_id, 503, ServiceUnavailableError(message).to_body())
