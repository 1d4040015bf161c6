"""OpenAI batches on a direct backend (first_core.inference.direct): no cluster runs them, so the
batch driver does, one chunk of lines per run, within the owner's token budget.

A direct batch is started like any other (`lifecycle._start`) with the task id `DIRECT_TASK`.
Each driver run then takes the next `batch_chunk_lines` lines of its input file: it asks the
owner's token budget for them (first_core.batches.budget, as the cluster's batch function does;
with too little left this minute it waits for a later run), POSTs each line to the upstream with
the gateway's key, writes the chunk's output and error lines as one S3 part each, settles the
grant with what the lines used and records the counts and usage on the batch. When no line is
left (or the batch was cancelled, or its window passed) the parts are joined into the output and
error files and the batch is finalized as a cluster's `done` report would finalize it.

A driver that dies in the middle of a chunk runs that chunk again at its next run (its parts are
overwritten under the same keys): a line may reach the upstream twice, never be counted twice.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import httpx

from first_core import ratelimit, storage
from first_core.batches import budget
from first_core.batches.callbacks import _output_key, finalize, progress
from first_core.batches.lifecycle import OPEN_STATES
from first_core.errors import GatewayError, public_message
from first_core.inference.upstream import api_key
from first_core.registry import Endpoint, Registry
from first_core.schemas.wire import BatchEvent, Counts, answer_usage
from first_core.settings import get_settings
from first_core.tables import BatchRecord, update_if

log = logging.getLogger("first.batches")

_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}


def run_chunk(record: BatchRecord, now: float | None = None) -> str:
    """Advance a direct batch by one chunk (or end it); what happened, for the driver's report:
    `ran`, `waiting` (no tokens this minute), `finalized`, or `gone` (its model left)."""
    now = time.time() if now is None else now
    endpoint = Registry.current().endpoint(record.cluster, record.framework, record.model)
    lines = _input_lines(record)
    done = int(record.completed or 0) + int(record.failed or 0)
    stopping = record.status == "cancelling" or now > float(record.expires_at)
    if stopping or done >= len(lines) or endpoint is None or endpoint.direct is None:
        outcome = "cancelled" if stopping else "completed" if endpoint else "failed"
        return "finalized" if _finish(record, len(lines), outcome) else "gone"
    chunk = lines[done : done + get_settings().batch_chunk_lines]
    granted, chunk = _grant(record, endpoint, chunk)
    if not granted:
        return "waiting"
    started = time.monotonic()
    outputs, errors, usage = _run(endpoint, record, chunk)
    log.info(
        "direct batch %s: %d lines ran in %.2f s",
        record.batch_id,
        len(chunk),
        time.monotonic() - started,
    )
    index = done // max(1, get_settings().batch_chunk_lines)
    for which, rows in (("output", outputs), ("errors", errors)):
        if rows:  # an empty part is no part (and an empty PUT can stall the local S3)
            storage.put(_part(record, which, index), _jsonl(rows))
    budget.settle(record, usage.get("total_tokens", 0))
    _add_usage(record, usage)
    event = _event(record, "progress", len(lines), len(outputs), len(errors))
    progress(record, event)
    return "ran"


def _input_lines(record: BatchRecord) -> list[str]:
    text = storage.get(f"files/{record.input_file_id}.jsonl").decode()
    return [line for line in text.splitlines() if line.strip()]


def _grant(
    record: BatchRecord, endpoint: Endpoint, chunk: list[str]
) -> tuple[bool, list[str]]:
    """Tokens for the chunk's lines from the owner's budget (fewer lines if a minute allows
    less), or False: ask again at the next run."""
    cap = budget.line_max_tokens(record)
    costs = [ratelimit.prompt_estimate(len(line)) + cap for line in chunk]
    still = BatchRecord.status.is_in("validating", "in_progress")
    while chunk:
        want = sum(costs[: len(chunk)])
        event = BatchEvent(batch_id=record.batch_id, event="tokens", attempt=1, want=want)
        answer = budget.tokens(record, event, still)
        if answer.get("granted"):
            return True, chunk
        if not answer.get("continue") or answer.get("retry_in"):
            return False, chunk
        limit = int(answer.get("limit") or 0)  # more than a whole minute: fewer lines
        fitting = 0
        while fitting < len(chunk) and sum(costs[: fitting + 1]) <= limit:
            fitting += 1
        chunk = chunk[: max(1, fitting)] if fitting else chunk[:1]
        if not fitting:  # one line alone is over the limit: it runs, and the upstream decides
            return True, chunk
    return False, chunk


def _run(
    endpoint: Endpoint, record: BatchRecord, chunk: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    direct = endpoint.direct
    assert direct is not None
    headers = {"content-type": "application/json"}
    try:
        key = api_key(direct)
    except GatewayError as error:
        code = "upstream_key_missing"
        return [], [_failure(_custom_id(text), code, error.message) for text in chunk], {}
    if key:
        headers["authorization"] = f"Bearer {key}"
    outputs: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    timeout = httpx.Timeout(direct.timeout or get_settings().result_wait_seconds, connect=10.0)
    with httpx.Client(headers=headers, timeout=timeout) as http:
        for text in chunk:
            line = _parsed(text)
            custom_id = line.get("custom_id") if isinstance(line, dict) else None
            if not isinstance(line, dict) or line.get("url") not in _ROUTES:
                errors.append(_failure(custom_id, "invalid_request", "Not a batch line."))
                continue
            body = dict(line.get("body") or {})
            body["model"] = direct.upstream_model
            named = "max_tokens" in body or "max_completion_tokens" in body
            if line["url"] != "/v1/embeddings" and not named:
                body["max_tokens"] = budget.line_max_tokens(record)
            try:
                route = str(line["url"]).removeprefix("/v1")
                answer = http.post(f"{direct.base_url}{route}", json=body)
                result = answer.json()
            except (httpx.HTTPError, ValueError) as error:
                log.warning("direct batch %s: a line failed: %r", record.batch_id, error)
                errors.append(_failure(custom_id, "upstream_error", "The backend failed."))
                continue
            if isinstance(result, dict) and result.get("model") == direct.upstream_model:
                result["model"] = endpoint.model
            answered = _answered(custom_id, answer.status_code, result)
            if answer.status_code >= 400:
                errors.append(answered)
                continue
            outputs.append(answered)
            counted = answer_usage(result)
            if counted is not None:
                usage["prompt_tokens"] += counted.prompt_tokens
                usage["completion_tokens"] += counted.completion_tokens
                usage["total_tokens"] += counted.total_tokens
    return outputs, errors, usage


def _parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _custom_id(text: str) -> Any:
    line = _parsed(text)
    return line.get("custom_id") if isinstance(line, dict) else None


def _answered(custom_id: Any, status: int, body: Any) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": None,
    }


def _failure(custom_id: Any, code: str, message: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": public_message(message)},
    }


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows).encode()


def _part(record: BatchRecord, which: str, index: int) -> str:
    return f"batches/{record.batch_id}/parts/{which}-{index:06d}.jsonl"


def _add_usage(record: BatchRecord, usage: dict[str, int]) -> None:
    """The chunk's usage and counts onto the batch, as its progress so far."""
    if not any(usage.values()):
        return
    update_if(
        record,
        [
            BatchRecord.prompt_tokens.add(usage["prompt_tokens"]),
            BatchRecord.completion_tokens.add(usage["completion_tokens"]),
            BatchRecord.total_tokens.add(usage["total_tokens"]),
        ],
        BatchRecord.status.is_in(*OPEN_STATES),
    )


def _event(
    record: BatchRecord, kind: str, total: int, completed: int = 0, failed: int = 0, **more: Any
) -> BatchEvent:
    return BatchEvent(
        batch_id=record.batch_id,
        event=kind,  # type: ignore[arg-type]
        attempt=int(record.attempt or 1),
        completed=int(record.completed or 0) + completed,
        failed=int(record.failed or 0) + failed,
        total=total,
        **more,
    )


def _finish(record: BatchRecord, total: int, outcome: str) -> bool:
    """Join the parts into the output and error files and finalize the batch once."""
    chunk_lines = max(1, get_settings().batch_chunk_lines)
    done = int(record.completed or 0) + int(record.failed or 0)
    counts: dict[str, Counts] = {}
    for which in ("output", "errors"):
        parts = [
            storage.get_if_present(_part(record, which, index)) or b""
            for index in range((done + chunk_lines - 1) // chunk_lines)
        ]
        joined = b"".join(parts)
        if joined:
            storage.put(_output_key(record.batch_id, which), joined)
        counts[which] = Counts(lines=joined.count(b"\n"), bytes=len(joined))
    usage = {
        "prompt_tokens": int(record.prompt_tokens or 0),
        "completion_tokens": int(record.completion_tokens or 0),
        "total_tokens": int(record.total_tokens or 0),
    }
    event = _event(
        record,
        "done",
        total,
        outcome=outcome,
        usage=usage,
        output=counts["output"],
        errors=counts["errors"],
        error=None if outcome != "failed" else {
            "code": "model_gone", "message": "The model left the registry."
        },
    )
    return finalize(record, event)
