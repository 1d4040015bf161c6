"""CloudWatch for the local stack's metrics: on AWS, Lambda turns the functions' EMF lines into
CloudWatch metrics; here `first-gateway dev --metrics` keeps printing those lines and also puts
them into moto's CloudWatch, so what reads CloudWatch (the dashboard's refusal figures,
first_core.dashboard.refusals) reads the same metrics locally. The lines are parsed off the
process's stdout and sent from a background thread: no request waits for it."""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

log = logging.getLogger("first.local.metrics")


def metric_data(line: str) -> list[tuple[str, dict[str, Any]]]:
    """The (namespace, PutMetricData datum) pairs of one EMF line; none for any other line."""
    if not line.startswith('{"_aws"'):
        return []
    try:
        emf = json.loads(line)
        meta = emf["_aws"]
        stamp = datetime.fromtimestamp(meta["Timestamp"] / 1000, tz=UTC)
        out = []
        for directive in meta["CloudWatchMetrics"]:
            for names in directive["Dimensions"]:
                dimensions = [{"Name": n, "Value": str(emf[n])} for n in names]
                for metric in directive["Metrics"]:
                    values = emf[metric["Name"]]
                    for value in values if isinstance(values, list) else [values]:
                        datum = {
                            "MetricName": metric["Name"],
                            "Dimensions": dimensions,
                            "Value": float(value),
                            "Unit": metric.get("Unit", "None"),
                            "Timestamp": stamp,
                        }
                        out.append((str(directive["Namespace"]), datum))
        return out
    except (KeyError, TypeError, ValueError):
        return []


class _Tee:
    """stdout as before, with every EMF line also queued for CloudWatch."""

    def __init__(self, stream: TextIO, sink: queue.Queue[str]) -> None:
        self._stream, self._sink, self._partial = stream, sink, ""

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            if line.startswith('{"_aws"'):
                self._sink.put(line)
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def mirror_to_cloudwatch(endpoint_url: str, region: str = "us-east-1") -> None:
    """From now on, put the EMF lines this process prints into the CloudWatch at `endpoint_url`."""
    import boto3

    client = boto3.client("cloudwatch", endpoint_url=endpoint_url, region_name=region)
    lines: queue.Queue[str] = queue.Queue()

    def send() -> None:
        while True:
            for namespace, datum in metric_data(lines.get()):
                try:
                    client.put_metric_data(Namespace=namespace, MetricData=[datum])
                except Exception:  # a metric must never take the stack down
                    log.warning("could not put a metric into moto's CloudWatch", exc_info=True)

    threading.Thread(target=send, name="metrics-to-cloudwatch", daemon=True).start()
    sys.stdout = _Tee(sys.stdout, lines)  # type: ignore[assignment]
