"""Token usage: read from vLLM's answers, recorded once per request, reported by day and model.

Every request ends exactly once (`records.finish` moves its record to a terminal state under a
condition, and only the call that did so gets True); that call writes the request's one usage
record (`usage` table, key `user_id` + `{created_at}#{request_id}`) with a conditional put, so
even a repeated write cannot make a second one. `GET /v1/usage` queries a user's key range (or,
for admins, the `by_date` index day by day) and adds up per day and model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pynamodb.exceptions import DoesNotExist

from first_core.errors import InvalidRequestError, PermissionDeniedError
from first_core.settings import get_settings
from first_core.tables import (
    RequestRecord,
    StreamChunkBatch,
    UsageRecord,
    put_once,
    update_if,
)

if TYPE_CHECKING:
    from first_core.auth import Caller

log = logging.getLogger("first.usage")


@dataclass(frozen=True)
class Usage:
    """A request's token counts, as OpenAI's `usage` reports them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# ---- usage records: one per request, written when it ends -----------------------------------


def usage_sort_key(created_at: float, request_id: str) -> str:
    """`{created_at ISO 8601 UTC, microseconds}#{request_id}`: sorts by time, unique per request."""
    stamp = datetime.fromtimestamp(float(created_at), tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"{stamp}#{request_id}"


def _ms(start: float, end: float | None) -> int | None:
    if end is None:
        return None
    return max(0, round((float(end) - float(start)) * 1000))


def _first_contact(record: RequestRecord) -> float | None:
    """When the cluster's answer was first seen by a callback: the first stream batch, or, for
    a non-streamed request, when the whole answer came: the record ended with it."""
    if not record.stream:
        answered = record.response_status is not None and record.completed_at is not None
        return float(record.completed_at) if answered else None
    try:
        first = StreamChunkBatch.get(record.request_id, 0, consistent_read=True)
        return float(first.created_at)
    except DoesNotExist:
        return None


def usage_row(
    *,
    user_id: str,
    username: str,
    request_id: str,
    model: str,
    cluster: str,
    openai_path: str,
    stream: bool,
    status: str,
    usage: Usage,
    created: float,
    completed: float,
    first_contact: float | None = None,
) -> UsageRecord:
    """The usage record of one ended request or batch. Its key is made only of what was fixed
    when the request or batch was created, so every attempt to write it names the same item."""
    return UsageRecord(
        user_id,
        usage_sort_key(created, request_id),
        date=datetime.fromtimestamp(created, tz=UTC).strftime("%Y-%m-%d"),
        request_id=request_id,
        username=username,
        model=model,
        cluster=cluster,
        openai_path=openai_path,
        stream=stream,
        status=status,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        created_at=created,
        completed_at=completed,
        queued_ms=_ms(created, first_contact),
        first_token_ms=_ms(created, first_contact) if stream else None,
        total_ms=_ms(created, completed) or 0,
        expires_at=datetime.fromtimestamp(
            completed + get_settings().usage_retention_days * 86400, tz=UTC
        ),
    )


def build_record(record: RequestRecord, first_contact: float | None = None) -> UsageRecord:
    """The usage record of an ended request, from its request record alone (plus one read for
    the time of the first answer, unless the caller knows it: `first_contact`)."""
    return usage_row(
        user_id=record.user_id,
        username=record.username,
        request_id=record.request_id,
        model=record.model,
        cluster=record.cluster,
        openai_path=record.openai_path,
        stream=bool(record.stream),
        status=record.status,
        usage=Usage(
            int(record.prompt_tokens or 0),
            int(record.completion_tokens or 0),
            int(record.total_tokens or 0),
        ),
        created=float(record.created_at),
        completed=float(record.completed_at or record.updated_at or time.time()),
        first_contact=_first_contact(record) if first_contact is None else first_contact,
    )


def save_once(row: UsageRecord) -> bool:
    """Put the usage record unless it is there: a repeat (a finish path run twice, a retry
    after a crash) finds the item and changes nothing (False)."""
    return put_once(row, UsageRecord.sk.does_not_exist())


def write_record(record: RequestRecord, first_contact: float | None = None) -> bool:
    """Write the usage record of an ended request, once."""
    return save_once(build_record(record, first_contact))


def request_ended(record: RequestRecord, first_contact: float | None = None) -> None:
    """Called once, by `records.finish`, with the request record as the finishing update left
    it: the usage record, and the rate-limit reservation settled against the real use."""
    from first_core import ratelimit

    try:
        write_record(record, first_contact)
    except Exception:
        log.exception("could not write the usage record of %s", record.request_id)
    ratelimit.settle(record.rate_reservation, int(record.total_tokens or 0))


def late_usage(record: RequestRecord) -> None:
    """A cancelled stream's usage arrived after the request ended (it is billed): put it on the
    usage record and charge it to the rate-limit windows. Called once (the request record's
    update that sets these tokens is conditional)."""
    from first_core import ratelimit

    usage = Usage(
        int(record.prompt_tokens or 0),
        int(record.completion_tokens or 0),
        int(record.total_tokens or 0),
    )
    key = usage_sort_key(float(record.created_at), record.request_id)
    actions = [
        UsageRecord.prompt_tokens.set(usage.prompt_tokens),
        UsageRecord.completion_tokens.set(usage.completion_tokens),
        UsageRecord.total_tokens.set(usage.total_tokens),
    ]
    if not update_if(UsageRecord(record.user_id, key), actions, UsageRecord.sk.exists()):
        write_record(record)  # the usage record was never written: write it now, whole
    ratelimit.charge(record.rate_reservation, usage.total_tokens)


# ---- GET /v1/usage ------------------------------------------------------------------------------


# The dates `GET /v1/usage` takes. No usage record is older than the gateway (2024) or dated
# in the far future, and bounds well inside the calendar keep the report's date arithmetic
# (the default start 29 days before the end, a day past the end) from leaving it: 0001-01-01
# or 9999-12-31 are a 400 naming these bounds, never an overflow (a 500).
USAGE_EARLIEST_DATE = date(2000, 1, 1)
USAGE_LATEST_DATE = date(2999, 12, 31)


def _parse_date(value: str | None, name: str, default: date) -> date:
    if not value:
        return default
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(
            f"{name} must be a date like 2026-11-28, not {value[:40]!r}.", param=name
        ) from None
    if not USAGE_EARLIEST_DATE <= day <= USAGE_LATEST_DATE:
        raise InvalidRequestError(
            f"{name} must lie between {USAGE_EARLIEST_DATE} and {USAGE_LATEST_DATE}.", param=name
        )
    return day


def _rows_of_user(user_id: str, start: date, end: date) -> Iterator[UsageRecord]:
    return UsageRecord.query(
        user_id,
        UsageRecord.sk.between(start.isoformat(), f"{end.isoformat()}~"),
        consistent_read=True,
    )


def _rows_of_everyone(start: date, end: date) -> Iterator[UsageRecord]:
    day = start
    while day <= end:
        yield from UsageRecord.by_date.query(day.isoformat())
        day += timedelta(days=1)


def aggregate(rows: Iterable[UsageRecord], per_user: bool = False) -> list[dict[str, Any]]:
    """Totals per day and model (and user, for admins' `user=all`), sorted."""
    totals: dict[tuple[str, ...], dict[str, Any]] = {}
    for row in rows:
        key = (row.date, row.model, row.user_id) if per_user else (row.date, row.model)
        entry = totals.get(key)
        if entry is None:
            entry = totals[key] = {
                "date": row.date,
                "model": row.model,
                **({"user_id": row.user_id, "username": row.username} if per_user else {}),
                "requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
                "by_status": {},
            }
        entry["requests"] += 1
        entry["prompt_tokens"] += int(row.prompt_tokens or 0)
        entry["completion_tokens"] += int(row.completion_tokens or 0)
        entry["total_tokens"] += int(row.total_tokens or 0)
        entry["by_status"][row.status] = entry["by_status"].get(row.status, 0) + 1
    return [totals[key] for key in sorted(totals)]


def report(
    caller: Caller,
    user: str | None = None,
    start_date: str | None = None,
    end_date: str | None = None,
) -> dict[str, Any]:
    """The body of `GET /v1/usage`: the caller's own totals by day and model; an admin may ask
    for one user's (`user=<user_id>`) or everyone's (`user=all`)."""
    s = get_settings()
    today = datetime.now(tz=UTC).date()
    end = _parse_date(end_date, "end_date", today)
    start = _parse_date(start_date, "start_date", end - timedelta(days=29))
    if start > end:
        raise InvalidRequestError("start_date is after end_date.", param="start_date")
    if (end - start).days + 1 > s.usage_max_days:
        raise InvalidRequestError(
            f"At most {s.usage_max_days} days at once.", param="start_date"
        )
    target = user or caller.user_id
    if target != caller.user_id and not caller.is_admin:
        raise PermissionDeniedError(
            "Only gateway admins may see other users' usage.", param="user"
        )
    if target == "all":
        data = aggregate(_rows_of_everyone(start, end), per_user=True)
    else:
        data = aggregate(_rows_of_user(target, start, end))
    return {
        "object": "list",
        "user": target,
        "start_date": start.isoformat(),
        "end_date": end.isoformat(),
        "data": data,
    }
