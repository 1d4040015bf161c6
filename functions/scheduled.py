"""The scheduled functions (template.yaml: every minute), as plain Lambda handlers: each runs
one pass of its job in `first_core` and counts what it recovered."""

from __future__ import annotations

from typing import Any

from first_core import observability

observability.configure_logging()


def reconciler(event: Any, context: Any) -> dict[str, Any]:
    """Recover requests whose callback was lost (first_core.inference.reconciler)."""
    from first_core.inference.reconciler import reconcile

    report = reconcile().to_json()
    for what in ("completed", "failed", "timed_out"):
        if report[what]:
            observability.count("Recovered", len(report[what]), What=f"request_{what}")
    return report


def health_poller(event: Any, context: Any) -> dict[str, Any]:
    """Endpoint status and qstat into the registry table (first_core.registry.health)."""
    from first_core.registry.health import poll

    return poll().to_json()


def batch_driver(event: Any, context: Any) -> dict[str, Any]:
    """Finish batches whose done callback was lost and restart those whose task died
    (first_core.batches.driver)."""
    from first_core.batches.driver import drive

    report = drive().to_json()
    for what in ("finalized", "resubmitted", "ended"):
        if report[what]:
            observability.count("Recovered", len(report[what]), What=f"batch_{what}")
    return report
