"""The submitter, fed by the submit queue (template.yaml: `SubmitterQueueMapping`, with
ReportBatchItemFailures): the queued requests of each endpoint in one Globus Compute batch
(first_core.inference.queue)."""

from __future__ import annotations

from typing import Any

from first_core import observability
from first_core.inference.queue import submit_waiting

observability.configure_logging()


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Messages to deliver again come back as batch item failures."""
    report = submit_waiting({r["messageId"]: r["body"] for r in event.get("Records", [])})
    if report.submitted:
        observability.count("Submitted", len(report.submitted), What="queued")
    return {"batchItemFailures": [{"itemIdentifier": m} for m in report.retry]}
