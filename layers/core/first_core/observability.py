"""Structured logs and CloudWatch metrics, through aws-lambda-powertools.

- **Logs**: every `first.*` logger writes one JSON object per line (powertools' formatter:
  level, message, timestamp, service, and whatever `extra=` a call adds). Nothing logs a token,
  a header or a presigned URL; request and batch ids are what tie lines together.
- **Metrics**: `count` and `timing` write CloudWatch Embedded Metric Format lines to stdout,
  which Lambda turns into metrics in the `FIRST_METRICS_NAMESPACE` namespace, with the
  dimensions given plus `service` and `stage`. Each call writes its own line (a request's
  metrics never mix with another's, however many run at once in one process). Off where
  `POWERTOOLS_METRICS_DISABLED=true` (the local stack, unless `first-gateway dev --metrics`).

The metrics (see infra/OPERATOR.md for alarms):
    Requests       inference requests answered, by Route and Outcome (ok, refused, error,
                   cancelled: the client left first); a stream is counted when it ends
    RequestMs      their time in the gateway until the answer (or the stream's headers)
    Refused        refusals by Status (401, 403, 429, ...) and Code
    Callbacks      callbacks by Kind (result, stream, batch) and Outcome
    CallbackMs     time an accepted callback took in the control plane, by Kind
    Submitted      queued requests the submitter sent to Globus Compute
    Recovered      requests and batches the scheduled functions ended or restarted, by What
    Batches        batches ended, by Status and Kind (openai, first)
    BatchLines     lines of ended batches, by Outcome (completed, failed)
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Any

from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import (
    AmazonCloudWatchEMFProvider,
)

from first_core.settings import get_settings

SERVICE = "first-gateway"
_configured = False


def configure_logging() -> None:
    """JSON lines for the `first` loggers (called once by each entry point; repeats are no-ops)."""
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LambdaPowertoolsFormatter(service=SERVICE, utc=True))
    logger = logging.getLogger("first")
    logger.addHandler(handler)
    logger.setLevel(get_settings().log_level)
    logger.propagate = False  # Lambda's root handler would write each line a second time
    _configured = True


_write_lock = threading.Lock()


def _emit(name: str, unit: MetricUnit, value: float, dimensions: dict[str, Any]) -> None:
    if is_metrics_disabled():
        return
    settings = get_settings()
    try:
        # A provider of its own per metric (powertools' `Metrics` shares one buffer per process),
        # written in one call under a lock: concurrent requests never mix or split a line.
        metric = AmazonCloudWatchEMFProvider(
            namespace=settings.metrics_namespace,
            default_dimensions={"service": SERVICE, "stage": settings.stage},
        )
        metric.add_metric(name=name, unit=unit, value=value)
        for key, dimension in dimensions.items():
            metric.add_dimension(name=key, value=str(dimension))
        line = json.dumps(metric.serialize_metric_set(), separators=(",", ":")) + "\n"
    except Exception:  # a metric must never fail what it measures
        logging.getLogger("first.metrics").warning("could not emit metric %s", name)
        return
    with _write_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def count(name: str, value: float = 1, **dimensions: Any) -> None:
    """Emit one count metric (EMF) with the given dimensions."""
    _emit(name, MetricUnit.Count, value, dimensions)


def timing(name: str, milliseconds: float, **dimensions: Any) -> None:
    """Emit one timing metric in milliseconds (EMF) with the given dimensions."""
    _emit(name, MetricUnit.Milliseconds, milliseconds, dimensions)
