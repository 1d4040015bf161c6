"""The admins' figures over a window (`GET /v1/admin/activity?hours=N`), all from rows the
request path already writes: the usage row of every ended request (model, user, cluster,
status, tokens, latency), the open requests (`by_open_status`), the batch records.

- live rates: requests and tokens per minute over the last five minutes, and requests open now;
- per model: requests, tokens, distinct users, latency percentiles and a latency histogram;
- per user: requests and tokens; a time series per model (hourly up to two days, else daily);
- outcomes: ended requests by status, the error rate (failed, timed out) and the cancel rate;
- batches: counts by status and the most recent ones.

- refusals: answered before any request record exists (401, 403, 429, ...), so they are read
  from the `Refused` and `Requests` metrics (first_core.dashboard.refusals).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from first_core.auth import Caller
from first_core.dashboard.history import require_admin, rows_since, window_hours
from first_core.dashboard.refusals import refusals
from first_core.tables import BatchRecord, RequestRecord, UsageRecord

LIVE_SECONDS = 300
# Upper bounds (ms) of the latency histogram's buckets; the last bucket is everything above.
LATENCY_BUCKETS_MS = (100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000)
ERROR_STATUSES = frozenset({"failed", "timed_out"})
RECENT_BATCHES = 20


def activity(caller: Caller, hours_param: str | None, now: float) -> dict[str, Any]:
    """The admins' overview of the last `hours` (default 24)."""
    require_admin(caller)
    hours = window_hours(hours_param)
    since = now - hours * 3600
    rows = list(rows_since(since, now))
    live = [row for row in rows if float(row.created_at) >= now - LIVE_SECONDS]
    statuses = Counter(row.status for row in rows)
    ended = sum(statuses.values())
    return {
        "object": "activity",
        "hours": hours,
        "since": since,
        "now": now,
        "live": {
            "seconds": LIVE_SECONDS,
            "requests_per_minute": round(len(live) * 60 / LIVE_SECONDS, 2),
            "tokens_per_minute": round(_tokens(live) * 60 / LIVE_SECONDS, 1),
            "open_requests": _open_requests(),
        },
        "totals": {"requests": ended, "tokens": _tokens(rows), "users": _distinct_users(rows)},
        "outcomes": {
            "by_status": dict(sorted(statuses.items())),
            "error_rate": _rate(sum(statuses[s] for s in ERROR_STATUSES), ended),
            "cancel_rate": _rate(statuses["cancelled"], ended),
        },
        "refusals": refusals(since, now),
        "models": _per_model(rows),
        "users": _per_user(rows),
        "series": _series(rows, since, now, 3600 if hours <= 48 else 86400),
        "batches": _batches(),
    }


def _tokens(rows: Iterable[UsageRecord]) -> int:
    return sum(int(row.total_tokens or 0) for row in rows)


def _distinct_users(rows: Iterable[UsageRecord]) -> int:
    return len({row.user_id for row in rows})


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _open_requests() -> int:
    return sum(1 for _ in RequestRecord.by_open_status.query("open"))


def percentile(values: list[int], fraction: float) -> int | None:
    """The nearest-rank percentile of sorted `values` (None for none)."""
    if not values:
        return None
    rank = max(1, min(len(values), round(fraction * len(values) + 0.5)))
    return values[rank - 1]


def histogram(values: Iterable[int]) -> list[int]:
    """Counts per latency bucket (`LATENCY_BUCKETS_MS`, then one for everything above)."""
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for value in values:
        index = next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if value <= b), -1)
        counts[index] += 1
    return counts


def _per_model(rows: list[UsageRecord]) -> list[dict[str, Any]]:
    by_model: dict[str, list[UsageRecord]] = defaultdict(list)
    for row in rows:
        by_model[row.model].append(row)
    out = []
    for model, mine in sorted(by_model.items()):
        latencies = sorted(int(row.total_ms or 0) for row in mine)
        out.append(
            {
                "model": model,
                "requests": len(mine),
                "tokens": _tokens(mine),
                "users": _distinct_users(mine),
                "errors": sum(1 for row in mine if row.status in ERROR_STATUSES),
                "latency_ms": {
                    "p50": percentile(latencies, 0.5),
                    "p90": percentile(latencies, 0.9),
                    "p99": percentile(latencies, 0.99),
                    "buckets": list(LATENCY_BUCKETS_MS),
                    "histogram": histogram(latencies),
                },
            }
        )
    return out


def _per_user(rows: list[UsageRecord]) -> list[dict[str, Any]]:
    by_user: dict[str, list[UsageRecord]] = defaultdict(list)
    for row in rows:
        by_user[row.user_id].append(row)
    users = [
        {
            "user_id": user_id,
            "username": mine[0].username,
            "requests": len(mine),
            "tokens": _tokens(mine),
        }
        for user_id, mine in by_user.items()
    ]
    return sorted(users, key=lambda user: (-user["requests"], user["username"]))


def _series(rows: list[UsageRecord], since: float, now: float, step: int) -> dict[str, Any]:
    """Requests and tokens per model per bucket of `step` seconds, every bucket listed."""
    start = int(since // step) * step
    buckets = list(range(start, int(now) + 1, step))
    models: dict[str, dict[str, list[int]]] = {}
    for row in rows:
        index = (int(float(row.created_at)) - start) // step
        entry = models.setdefault(
            row.model, {"requests": [0] * len(buckets), "tokens": [0] * len(buckets)}
        )
        entry["requests"][index] += 1
        entry["tokens"][index] += int(row.total_tokens or 0)
    fmt = "%Y-%m-%dT%H:00Z" if step < 86400 else "%Y-%m-%d"
    return {
        "step_seconds": step,
        "labels": [datetime.fromtimestamp(b, tz=UTC).strftime(fmt) for b in buckets],
        "models": dict(sorted(models.items())),
    }


def _batches() -> dict[str, Any]:
    """Every batch's status counted, and the most recent ones (a scan of the batches table:
    it holds a row per batch, far fewer than requests)."""
    records = list(BatchRecord.scan())
    recent = sorted(records, key=lambda record: -float(record.created_at))
    return {
        "by_status": dict(sorted(Counter(record.status for record in records).items())),
        "recent": [
            {
                "id": record.batch_id,
                "username": record.username,
                "model": record.model,
                "cluster": record.cluster,
                "status": record.status,
                "total": int(record.total or 0),
                "completed": int(record.completed or 0),
                "failed": int(record.failed or 0),
                "created_at": float(record.created_at),
            }
            for record in itertools.islice(recent, RECENT_BATCHES)
        ],
    }


def set_cluster_maintenance(caller: Caller, cluster: str, body: bytes) -> dict[str, Any]:
    """Admins only: put a cluster in maintenance or take it out (`{"maintenance": true}`),
    through the registry's own switch (`registry.health.set_maintenance`, as the CLI)."""
    import json

    from first_core.errors import InvalidRequestError, NotFoundError
    from first_core.registry import Registry
    from first_core.registry.health import set_maintenance

    require_admin(caller)
    try:
        wanted = json.loads(body or b"null")
    except ValueError:
        wanted = None
    if not isinstance(wanted, dict) or not isinstance(wanted.get("maintenance"), bool):
        raise InvalidRequestError(
            'The body must be {"maintenance": true} or {"maintenance": false}.',
            param="maintenance",
        )
    try:
        set_maintenance(cluster, wanted["maintenance"])
    except KeyError:
        raise NotFoundError(f"No cluster '{cluster[:80]}'.", param="cluster") from None
    return {"cluster": cluster, "status": Registry.current().cluster(cluster).status}
