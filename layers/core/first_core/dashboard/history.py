"""Requests as lists: a user's own (`GET /v1/requests`, from their request records) and, for
admins, everyone's recent ended requests with filters (`GET /v1/admin/requests`, from the usage
rows each ended request already has). Both are read-only, newest first, paged."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from first_core.auth import Caller
from first_core.batches.files import cursor_page
from first_core.errors import InvalidRequestError, PermissionDeniedError
from first_core.inference import records
from first_core.tables import RequestRecord, UsageRecord

# The filters of the admins' request log, and the longest window it looks back over.
LOG_FILTERS = ("user", "model", "cluster", "status")
MAX_WINDOW_HOURS = 31 * 24


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def request_summary(record: RequestRecord) -> dict[str, Any]:
    """One line of a user's request list (the detail is `GET /v1/requests/{id}`)."""
    created, completed = float(record.created_at), record.completed_at
    return {
        "id": record.request_id,
        "object": "request",
        "status": record.status,
        "model": record.model,
        "cluster": record.cluster,
        "openai_path": record.openai_path,
        "stream": bool(record.stream),
        "created_at": created,
        "completed_at": None if completed is None else float(completed),
        "latency_ms": None if completed is None else round((float(completed) - created) * 1000),
        "usage": {
            "prompt_tokens": _int(record.prompt_tokens),
            "completion_tokens": _int(record.completion_tokens),
            "total_tokens": _int(record.total_tokens),
        },
        "error": record.error,
    }


def own_requests(caller: Caller, limit: int, after: str | None) -> dict[str, Any]:
    """The caller's requests, newest first, as OpenAI's cursor page (`after` = a request id of
    theirs; someone else's is the same 404 as a missing one)."""
    condition = None
    if after:
        condition = RequestRecord.created_at < records.get_owned(after, caller).created_at
    newest = RequestRecord.by_user.query(caller.user_id, condition, scan_index_forward=False)
    return cursor_page(newest, limit, request_summary)


def window_hours(value: str | None, default: int = 24) -> int:
    """A window in hours, 1 to 31 days."""
    try:
        hours = int(value) if value else default
    except ValueError:
        raise InvalidRequestError("hours must be an integer.", param="hours") from None
    if not 1 <= hours <= MAX_WINDOW_HOURS:
        raise InvalidRequestError(f"hours must be between 1 and {MAX_WINDOW_HOURS}.", param="hours")
    return hours


def rows_since(since: float, now: float, newest_first: bool = False) -> Iterator[UsageRecord]:
    """Everyone's usage rows of requests created since `since` (the `by_date` index, one
    query per day of the window)."""
    first = datetime.fromtimestamp(since, tz=UTC).date()
    last = datetime.fromtimestamp(now, tz=UTC).date()
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    for day in reversed(days) if newest_first else days:
        for row in UsageRecord.by_date.query(day.isoformat(), scan_index_forward=not newest_first):
            if float(row.created_at) >= since:
                yield row


def usage_line(row: UsageRecord) -> dict[str, Any]:
    """One ended request as the admins' log shows it."""
    return {
        "id": row.request_id,
        "user_id": row.user_id,
        "username": row.username,
        "model": row.model,
        "cluster": row.cluster,
        "openai_path": row.openai_path,
        "stream": bool(row.stream),
        "status": row.status,
        "created_at": float(row.created_at),
        "latency_ms": _int(row.total_ms),
        "total_tokens": _int(row.total_tokens),
    }


def request_log(caller: Caller, params: dict[str, str], limit: int, now: float) -> dict[str, Any]:
    """Admins only: everyone's ended requests of the last `hours`, newest first, filtered by
    any of user (id or username), model, cluster, status; `after` = the last id of the page
    before."""
    require_admin(caller)
    since = now - window_hours(params.get("hours")) * 3600
    wanted = {name: params[name] for name in LOG_FILTERS if params.get(name)}
    lines = (usage_line(row) for row in rows_since(since, now, newest_first=True))
    matching: Iterator[dict[str, Any]] = (line for line in lines if _matches(line, wanted))
    after = params.get("after")
    if after:
        matching = _after(matching, after)
    return cursor_page(matching, limit, lambda line: line)


def _matches(line: dict[str, Any], wanted: dict[str, str]) -> bool:
    for name, value in wanted.items():
        if name == "user":
            if value not in (line["user_id"], line["username"]):
                return False
        elif line[name] != value:
            return False
    return True


def _after(lines: Iterator[dict[str, Any]], after: str) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line["id"] == after:
            break
    yield from lines


def require_admin(caller: Caller) -> None:
    """403 unless the caller is in an admin group."""
    if not caller.is_admin:
        raise PermissionDeniedError("Only gateway admins may see this.")
