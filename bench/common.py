"""Helpers shared by the benchmark scripts: start the local stack, describe the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.node()} | {cpu} | {os.cpu_count()} cores | Python {platform.python_version()} "
        f"| load average {load:.2f}"
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(values) * 1000,
        "p95_ms": percentile(values, 0.95) * 1000,
        "mean_ms": statistics.fmean(values) * 1000,
    }


def timed_chat(
    client: Any, model: str, messages: Any, phases: list[dict[str, float]] | None = None
) -> float:
    """Seconds for one non-streamed chat request (max_tokens 32, the answer read whole); with
    `phases`, the gateway's own account of its time (its Server-Timing header) appended there."""
    start = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=32
    )
    elapsed = time.perf_counter() - start
    raw.parse()
    if phases is not None:
        phases.append(
            {
                name: float(duration)
                for name, _, duration in (
                    part.strip().partition(";dur=")
                    for part in raw.headers["server-timing"].split(",")
                )
            }
        )
    return elapsed


@contextmanager
def local_stack(*options: str) -> Iterator[dict[str, Any]]:
    """`first-gateway dev OPTIONS` on a free port; yields its state (addresses). Globus
    Compute's API limit is off (the gateway's own time is measured, not the service's quota;
    `bench.load --compute-api-limit` measures that), unless OPTIONS set it."""
    from first_local.stack import stack_process

    if "--compute-api-limit" not in options:
        options = (*options, "--compute-api-limit", "0")
    with stack_process(*options) as state:
        yield state
