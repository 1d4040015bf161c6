"""Cold import of each function's handler module: what a Lambda cold start pays before its
first request, measured with `python -X importtime` in fresh interpreters.

Each module is imported `--runs` times, each in a new process; the figure is the least
cumulative time (the machine's noise only ever adds), with the median beside it, and the
modules that cost the most on their own in the fastest run.

    .venv/bin/python -m bench.imports [--runs 7] [--top 8]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from bench.common import ROOT, machine

# Handler modules (template.yaml): the proxy, the control plane (Chalice), the submitter, the
# scheduled functions (reconciler, health poller, batch driver).
MODULES = ("functions.proxy.app", "app", "functions.submitter", "functions.scheduled")


def importtime(module: str) -> dict[str, tuple[int, int]]:
    """Each imported module's (self, cumulative) microseconds, in one fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    times: dict[str, tuple[int, int]] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, total, name = (part.strip() for part in line[len("import time:") :].split("|"))
        if own.isdigit():
            times[name] = (int(own), int(total))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    for module in MODULES:
        runs = [importtime(module) for _ in range(args.runs)]
        totals = [run[module][1] for run in runs]
        fastest = runs[totals.index(min(totals))]
        heavy = sorted(fastest.items(), key=lambda kv: -kv[1][0])[: args.top]
        print(
            f"{module}: {min(totals) / 1000:.0f} ms (median {statistics.median(totals) / 1000:.0f}"
            f" ms of {args.runs}); {len(fastest)} modules; most on their own: "
            + ", ".join(f"{name} {own / 1000:.0f}" for name, (own, _) in heavy)
        )
        print("  loaded: " + ", ".join(
            name for name in ("pynamodb", "botocore", "boto3", "globus_sdk", "globus_compute_sdk",
                              "requests", "chalice", "starlette", "pydantic") if name in fastest
        ))


if __name__ == "__main__":
    main()
