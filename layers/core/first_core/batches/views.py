"""How a batch looks: OpenAI's Batch object and list page, and FIRST's status, list and
result (first_core.batches has its life)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from first_core.auth import Caller
from first_core.batches import files
from first_core.batches.lifecycle import TERMINAL_STATES, get_owned
from first_core.errors import ConflictError, InvalidRequestError
from first_core.tables import BatchRecord


def _int(value: Any) -> int | None:
    return int(value) if value is not None else None


def view(record: BatchRecord) -> dict[str, Any]:
    """OpenAI's Batch object (with `model`, `usage` and FIRST's own fields beside it)."""
    done = record.status in TERMINAL_STATES
    return {
        "id": record.batch_id,
        "object": "batch",
        "endpoint": record.endpoint,
        "model": record.model,
        "errors": {"object": "list", "data": record.errors} if record.errors else None,
        "input_file_id": record.input_file_id or record.input_path,
        "completion_window": record.completion_window,
        "status": record.status,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "created_at": int(record.created_at),
        "in_progress_at": _int(record.in_progress_at),
        "expires_at": int(record.expires_at),
        "finalizing_at": _int(record.finalizing_at),
        "completed_at": _int(record.completed_at),
        "failed_at": _int(record.failed_at),
        "expired_at": _int(record.expired_at),
        "cancelling_at": _int(record.cancelling_at),
        "cancelled_at": _int(record.cancelled_at),
        "request_counts": {
            "total": int(record.total),
            "completed": int(record.completed),
            "failed": int(record.failed),
        },
        "metadata": record.metadata,
        "usage": {
            "input_tokens": int(record.prompt_tokens),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": int(record.completion_tokens),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": int(record.total_tokens),
        }
        if done
        else None,
        # FIRST's: where it ran, how often it was (re)started, what the last start resumed.
        "cluster": record.cluster or None,
        "attempts": int(record.attempt),
        "resumed_lines": int(record.resumed_lines),
        # The owner's token budget it runs on: tokens taken so far, and since when it waits for
        # the minute to have room for its next lines (first_core.batches.budget).
        "tokens_granted": int(record.tokens_granted or 0),
        "waiting_for_tokens_since": _int(record.waiting_for_tokens_at),
    }


def list_page(caller: Caller, limit: int, after: str | None) -> dict[str, Any]:
    """The caller's batches, newest first, as OpenAI's cursor page."""
    condition = None
    if after:
        condition = BatchRecord.created_at < get_owned(after, caller).created_at
    newest_first = BatchRecord.by_user.query(caller.user_id, condition, scan_index_forward=False)
    return files.cursor_page(newest_first, limit, view)


# FIRST's names for the states (its clients read these).
_FIRST_STATUS = {
    "validating": "pending",
    "in_progress": "running",
    "finalizing": "running",
    "cancelling": "running",
    "completed": "completed",
    "failed": "failed",
    "expired": "failed",
    "cancelled": "cancelled",
}


def first_status(record: BatchRecord) -> str:
    """FIRST's name for the batch's status."""
    return _FIRST_STATUS[record.status]


def first_summary(record: BatchRecord) -> dict[str, Any]:
    """FIRST's batch summary (its list and submit answers)."""

    def iso(value: Any) -> str | None:
        if value is None:
            return None
        return datetime.fromtimestamp(float(value), tz=UTC).isoformat()

    return {
        "batch_id": record.batch_id,
        "id": record.batch_id,
        "cluster": record.cluster,
        "framework": record.framework,
        "model": record.model,
        "input_file": record.input_path or record.input_file_id,
        "output_folder_path": record.output_folder_path,
        "status": first_status(record),
        "created_at": iso(record.created_at),
        "in_progress_at": iso(record.in_progress_at),
        "completed_at": iso(record.completed_at),
        "failed_at": iso(record.failed_at or record.expired_at),
    }


def first_list(caller: Caller, status: str | None) -> list[dict[str, Any]]:
    """The caller's batches in FIRST's shape, newest first, optionally only those in one FIRST
    status (400 for an unknown one)."""
    if status is not None and status not in set(_FIRST_STATUS.values()):
        raise InvalidRequestError(
            f"status must be one of {', '.join(sorted(set(_FIRST_STATUS.values())))}.",
            param="status",
        )
    summaries = [
        first_summary(r)
        for r in BatchRecord.by_user.query(caller.user_id, scan_index_forward=False)
    ]
    return [s for s in summaries if status is None or s["status"] == status]


def first_result(record: BatchRecord) -> dict[str, Any]:
    """FIRST's result: where the cluster wrote the answers, once the batch has ended well."""
    if record.status in ("failed", "expired"):
        reasons = "; ".join(e.get("message", "") for e in record.errors or []) or record.status
        raise InvalidRequestError(f"Batch {record.status}: {reasons}", code="batch_failed")
    if record.status not in ("completed", "cancelled"):
        raise ConflictError(
            f"Batch {record.batch_id} is {record.status}; its results are not ready.",
            code="batch_not_completed",
        )
    openai = view(record)
    return {
        "batch_id": record.batch_id,
        "status": first_status(record),
        "output_file": record.output_path,
        "error_file": record.error_path,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "request_counts": openai["request_counts"],
        "usage": openai["usage"],
    }
