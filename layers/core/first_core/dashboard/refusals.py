"""Refusals for the admins' page, from the metrics the gateway already emits (no new write):
CloudWatch's `Refused` (by Status and Code: every 4xx/5xx refusal of both planes) and
`Requests` (inference requests answered, by Outcome) in `FIRST_METRICS_NAMESPACE`, this stage
only, summed over the window. On AWS the functions' EMF lines become these metrics; on the local
stack `first-gateway dev --metrics` mirrors them into moto's CloudWatch (first_local.metrics).
Where CloudWatch cannot be read, the page says so instead of failing."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import boto3

from first_core.settings import get_settings

log = logging.getLogger("first.dashboard")


def _client() -> Any:
    s = get_settings()
    return boto3.client("cloudwatch", region_name=s.aws_region, endpoint_url=s.aws_endpoint_url)


def _sums(client: Any, name: str, by: str, since: float, now: float) -> Counter[str]:
    """The metric's sum over the window per value of the dimension `by`."""
    s = get_settings()
    period = max(60, int((now - since) // 60 + 1) * 60)
    totals: Counter[str] = Counter()
    pages = client.get_paginator("list_metrics").paginate(
        Namespace=s.metrics_namespace,
        MetricName=name,
        Dimensions=[{"Name": "stage", "Value": s.stage}],
    )
    seen: set[tuple[tuple[str, str], ...]] = set()
    for page in pages:
        for metric in page.get("Metrics", []):
            dimensions = metric.get("Dimensions", [])
            value = next((d["Value"] for d in dimensions if d["Name"] == by), None)
            # Each metric (its set of dimensions) once: moto lists one per data point.
            key = tuple(sorted((d["Name"], d["Value"]) for d in dimensions))
            if value is None or key in seen:
                continue
            seen.add(key)
            points = client.get_metric_statistics(
                Namespace=s.metrics_namespace,
                MetricName=name,
                Dimensions=dimensions,
                StartTime=datetime.fromtimestamp(since, tz=UTC),
                EndTime=datetime.fromtimestamp(now, tz=UTC),
                Period=period,
                Statistics=["Sum"],
            ).get("Datapoints", [])
            totals[value] += int(sum(point.get("Sum", 0) for point in points))
    return totals


def refusals(since: float, now: float) -> dict[str, Any]:
    """Refusals by status and code, inference requests by outcome, and the share refused."""
    try:
        client = _client()
        by_status = _sums(client, "Refused", "Status", since, now)
        by_code = _sums(client, "Refused", "Code", since, now)
        outcomes = _sums(client, "Requests", "Outcome", since, now)
    except Exception as error:  # the page shows the rest; this part says it is unavailable
        log.warning("refusal metrics unavailable: %s", type(error).__name__)
        return {"available": False}
    answered = sum(outcomes.values())
    return {
        "available": True,
        "refused": sum(by_status.values()),
        "by_status": dict(sorted(by_status.items())),
        "by_code": dict(sorted(by_code.items())),
        "requests_by_outcome": dict(sorted(outcomes.items())),
        "refusal_rate": round(outcomes["refused"] / answered, 4) if answered else 0.0,
    }
