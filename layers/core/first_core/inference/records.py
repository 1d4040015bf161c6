"""The life of a request record: created `submitted`, ended once in a terminal state."""

from __future__ import annotations

import time
import uuid
from typing import Any

from first_core import usage as usage_module
from first_core.auth import Caller
from first_core.errors import NotFoundError, public_message
from first_core.registry import Endpoint
from first_core.settings import get_settings
from first_core.tables import TERMINAL_STATUSES, RequestRecord, owned_item, update_if
from first_core.usage import Usage


def new_request_id() -> str:
    """A new request id: `req_` and 32 hex digits."""
    return f"req_{uuid.uuid4().hex}"


def _record(
    request_id: str,
    caller: Caller,
    endpoint: Endpoint,
    openai_path: str,
    stream: bool,
    **fields: Any,
) -> RequestRecord:
    """A request record with who asked, where it was routed and what it asked for; `fields`, the
    rest of its state."""
    return RequestRecord(
        request_id,
        user_id=caller.user_id,
        username=caller.username,
        model=endpoint.model,
        cluster=endpoint.cluster,
        framework=endpoint.framework,
        endpoint_id=endpoint.endpoint_id,
        openai_path=openai_path,
        stream=stream,
        **fields,
    )


def create(
    request_id: str,
    caller: Caller,
    endpoint: Endpoint,
    openai_path: str,
    stream: bool,
    route_reason: str,
    rate_reservation: dict[str, Any] | None = None,
    queued: bool = False,
    max_tokens: int | None = None,
    choices: int = 1,
    prompt_bytes: int | None = None,
) -> None:
    """Write the request record, `submitted` and open, with the caller, the endpoint and the route's
    reason; the record is what the reconciler and `GET /v1/requests` read. `max_tokens` (per
    choice), `choices` and `prompt_bytes` are what was sent: the bounds of its callbacks."""
    now = time.time()
    record = _record(
        request_id,
        caller,
        endpoint,
        openai_path,
        stream,
        status="submitted",
        open_status="open",
        route_reason=route_reason,
        created_at=now,
        updated_at=now,
        rate_reservation=rate_reservation or None,
        queued_at=now if queued else None,
        max_tokens=max_tokens,
        choices=choices,
        prompt_bytes=prompt_bytes,
    )
    record.save(condition=RequestRecord.request_id.does_not_exist())


def ended(
    request_id: str,
    caller: Caller,
    endpoint: Endpoint,
    openai_path: str,
    stream: bool,
    route_reason: str,
    *,
    status: str,
    created_at: float,
    usage: Usage | None = None,
    error: str | None = None,
    response_body: str | None = None,
    rate_reservation: dict[str, Any] | None = None,
) -> RequestRecord:
    """The record of a request that ended where it was answered (a direct backend's: nothing
    runs elsewhere to end it later), whole, to be written in one put (`save_ended`)."""
    assert status in TERMINAL_STATUSES
    now = time.time()
    tokens = usage or Usage()
    return _record(
        request_id,
        caller,
        endpoint,
        openai_path,
        stream,
        status=status,
        route_reason=route_reason,
        created_at=created_at,
        updated_at=now,
        completed_at=now,
        rate_reservation=rate_reservation or None,
        prompt_tokens=tokens.prompt_tokens if usage else None,
        completion_tokens=tokens.completion_tokens if usage else None,
        total_tokens=tokens.total_tokens if usage else None,
        error=public_message(error, limit=2000) if error is not None else None,
        response_body=response_body,
    )


def save_ended(record: RequestRecord) -> None:
    """Write an ended request's record (`ended`), its only write: its id is new (`new_request_id`)
    and only the request that made it writes it, so the put needs no condition."""
    record.save()


def set_task(request_id: str, task_id: str, batch_id: str | None = None) -> bool:
    """Remember the compute task, so the reconciler can look it up if the callback is lost.

    With `batch_id` (a submitter's batch), only if that batch still holds the request and no
    task is recorded yet: False if not."""
    if batch_id is None:
        RequestRecord(request_id).update(actions=[RequestRecord.task_id.set(task_id)])
        return True
    return _update_if(request_id, [RequestRecord.task_id.set(task_id)], _held_by(batch_id))


# A queued request no submitter holds yet, that has not been sent and has not ended.
_UNCLAIMED = (
    RequestRecord.request_id.exists()
    & RequestRecord.open_status.exists()
    & RequestRecord.task_id.does_not_exist()
    & RequestRecord.batch_id.does_not_exist()
)


def _held_by(batch_id: str) -> Any:
    """The request is claimed by this submitter's batch, and not sent yet."""
    return (RequestRecord.batch_id == batch_id) & RequestRecord.task_id.does_not_exist()


def claim(request_id: str, batch_id: str) -> bool:
    """A submitter takes a queued request for its batch; False if another has it, it was sent
    already, or it ended. Only the one claim that succeeds may send it: no request runs twice."""
    actions = [RequestRecord.batch_id.set(batch_id), RequestRecord.claimed_at.set(time.time())]
    return _update_if(request_id, actions, _UNCLAIMED)


def take_over(request_id: str, stale_batch_id: str, batch_id: str) -> bool:
    """Move a claim from a batch that never reached Globus Compute to another."""
    actions = [RequestRecord.batch_id.set(batch_id), RequestRecord.claimed_at.set(time.time())]
    return _update_if(request_id, actions, _held_by(stale_batch_id))


def release(request_id: str, batch_id: str) -> bool:
    """Give a claim back (its batch was never sent), so the request can be sent again."""
    actions = [RequestRecord.batch_id.remove(), RequestRecord.claimed_at.remove()]
    return _update_if(request_id, actions, _held_by(batch_id))


def claim_is_stale(record: RequestRecord, now: float) -> bool:
    """The submitter holding this claim has had its time (`FIRST_SUBMIT_CLAIM_SECONDS`): it
    stopped, or its batch's outcome is unknown."""
    return now - float(record.claimed_at or 0) >= get_settings().submit_claim_seconds


def usage_actions(usage: Usage) -> list[Any]:
    """The writes that put a request's token counts on its record."""
    return [
        RequestRecord.prompt_tokens.set(usage.prompt_tokens),
        RequestRecord.completion_tokens.set(usage.completion_tokens),
        RequestRecord.total_tokens.set(usage.total_tokens),
    ]


def _update_if(request_id: str, actions: list[Any], condition: Any) -> bool:
    return update_if(RequestRecord(request_id), actions, condition)


def finish_actions(status: str, usage: Usage | None = None, error: str | None = None) -> list[Any]:
    """The update that moves a request to a terminal state (with usage, or the error)."""
    assert status in TERMINAL_STATUSES
    now = time.time()
    actions: list[Any] = [
        RequestRecord.status.set(status),
        RequestRecord.open_status.remove(),
        RequestRecord.updated_at.set(now),
        RequestRecord.completed_at.set(now),
    ]
    if usage is not None:
        actions += usage_actions(usage)
    if error is not None:
        # `GET /v1/requests/{id}` shows it: in the client's words (the detail is logged where
        # the error was met).
        actions.append(RequestRecord.error.set(public_message(error, limit=2000)))
    return actions


def answer_actions(status_code: int, text: str | None, s3_key: str | None) -> list[Any]:
    """The writes that keep a non-streamed answer on its record: the backend's status, and the
    JSON body inline (`text`) or where it is in the results bucket (`s3_key`)."""
    actions: list[Any] = [RequestRecord.response_status.set(status_code)]
    if s3_key is not None:
        actions.append(RequestRecord.response_s3_key.set(s3_key))
    elif text is not None:
        actions.append(RequestRecord.response_body.set(text))
    return actions


# A request may end only once, and only if it exists.
STILL_OPEN = RequestRecord.request_id.exists() & ~RequestRecord.status.is_in(*TERMINAL_STATUSES)


def finish(
    request_id: str,
    status: str,
    usage: Usage | None = None,
    error: str | None = None,
    *,
    first_contact: float | None = None,
    answer: list[Any] | None = None,
) -> bool:
    """Move a request to a terminal state once; a second attempt changes nothing (False).

    The one call that ends it (True) also writes the request's usage record and settles its
    rate-limit reservation (`usage.request_ended`), from the record as this update left it.
    `first_contact`, when the caller knows it (when the answer came, or the first stream
    batch's time), spares the usage record a read to find it. `answer`: the writes that put a
    non-streamed answer on the record (`answer_actions`), made by this same update, so the
    record ends and holds its answer in one write, or neither.
    """
    record = RequestRecord(request_id)
    actions = finish_actions(status, usage, error) + (answer or [])
    if not update_if(record, actions, STILL_OPEN):
        return False
    # `update` left the whole new record in `record`.
    usage_module.request_ended(record, first_contact=first_contact)
    return True


def bill_after_cancel(request_id: str, usage: Usage) -> None:
    """The usage of what was generated for a request whose client left (it is billed though
    nobody read it): set once on the record, leaving its status alone, and on its usage record
    and rate-limit windows."""
    record = RequestRecord(request_id)
    once = (RequestRecord.status == "cancelled") & RequestRecord.total_tokens.does_not_exist()
    if update_if(record, usage_actions(usage), once):
        usage_module.late_usage(record)


def get_owned(request_id: str, caller: Caller) -> RequestRecord:
    """The record if the caller owns it; anyone else gets the same 404 as for a missing one."""
    record = owned_item(RequestRecord, request_id, caller.user_id)
    if record is None:
        raise NotFoundError(f"No request with id '{request_id}'.", param="request_id")
    return record
