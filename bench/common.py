"""Helpers shared by the benchmark scripts: start the local stack, describe the machine."""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
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


@contextmanager
def local_stack(*extra: str) -> Iterator[dict[str, Any]]:
    """`first-gateway dev` on a free port, in its own session; yields its state file."""
    from first_local.stack import free_port

    port = free_port()
    state_file = Path(tempfile.mkdtemp()) / "stack.json"
    command = [
        str(Path(sys.executable).with_name("first-gateway")),
        "dev",
        "--port",
        str(port),
        "--state-file",
        str(state_file),
        *extra,
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the local stack did not start")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                if state_file.exists():
                    break
            except OSError:
                pass
            time.sleep(0.2)
        yield json.loads(state_file.read_text())
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
