"""`python -m first_local.compute_standin --port P --config FILE`: the stand-in as a process.

FILE is JSON written by the local stack:

    {"endpoints": [{"endpoint_id": UUID, "name": "sophia", "workers": 4, "stopped": false}],
     "worker_env": {...}, "run_dir": DIR, "api_limit": "20/10", "fail_compute": 0.0,
     "kill_workers": 0.0, "start_delay": null}

`start_delay` (seconds) keeps every endpoint online with no workers until that long after
`POST /_standin/workers-arrive` (the stack calls it once the gateway answers); null: workers
from the start. Every engine is warmed up before the port opens.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvicorn

from first_local.compute_standin.service import ApiLimit, ComputeService, Faults, create_app


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Serve the Globus Compute stand-in and its endpoints (from `--config`) on `--port` until
    stopped."""
    parser = argparse.ArgumentParser(prog="first_local.compute_standin")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text())
    service = ComputeService(
        limit=ApiLimit.parse(str(config.get("api_limit", "20/10"))),
        faults=Faults(float(config.get("fail_compute", 0)), float(config.get("kill_workers", 0))),
    )
    run_dir = Path(config["run_dir"])
    delay = config.get("start_delay")
    # The engines' workers are processes of this one: a SIGTERM must reach `finally`.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        started = []
        for entry in config["endpoints"]:
            endpoint = service.add_endpoint(
                entry["endpoint_id"],
                entry["name"],
                int(entry["workers"]),
                config.get("worker_env", {}),
                run_dir / entry["name"],
            )
            if not entry.get("stopped"):
                endpoint.start(workers_in=math.inf if delay else 0.0)
                started.append(endpoint)
        with ThreadPoolExecutor(max(len(started), 1)) as pool:
            list(pool.map(lambda e: e.warm_up(service.warm_task), started))
        uvicorn.run(
            create_app(service), host="127.0.0.1", port=args.port, log_level="warning"
        )
    finally:
        for endpoint in service.endpoints.values():
            endpoint.shutdown()


if __name__ == "__main__":
    main()
