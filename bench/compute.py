"""What the Globus Compute stand-in itself costs, per call, as the gateway's SDK meets it.

Starts the local stack (no health poller, no reconciler, no API limit) and, from this process,
with the real `globus-compute-sdk` Client and the gateway's own credentials (from the state
file), times N of each, interleaved:

- `Client.run` of a no-op registered function (one `POST /v3/endpoints/{id}/submit`),
- `Client.get_task` of a finished task (one `GET /v2/tasks/{id}`),
- `Client.get_endpoint_status` (one `GET /v2/endpoints/{id}/status`),
- the same three routes as bare HTTP calls with httpx (keep-alive), which is the stand-in's own
  share (loopback HTTP plus its handler); the rest is the SDK's (serialization, its lock, its
  retry wrapper),
- a no-op task from submit until `get_task` sees it done (the engine's round trip), polling
  every 2 ms.

    .venv/bin/python -m bench.compute [--calls 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import httpx

from bench.common import local_stack, machine, summary


def noop() -> None:
    return None


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    options = ("--workers", "2", "--health-every", "0", "--reconcile-every", "0")
    with local_stack(*options) as state:
        os.environ.update(
            GLOBUS_COMPUTE_CLIENT_ID=state["compute_client_id"],
            GLOBUS_COMPUTE_CLIENT_SECRET=state["compute_client_secret"],
            GLOBUS_SDK_SERVICE_URL_AUTH=state["globus_auth_url"],
            GLOBUS_SDK_SERVICE_URL_COMPUTE=state["globus_compute_url"],
            GLOBUS_COMPUTE_USER_DIR=tempfile.mkdtemp(prefix="bench-compute-"),
        )
        import globus_sdk
        from globus_sdk.scopes import ComputeScopes

        from compute_funcs.register import make_client

        client = make_client()
        endpoint = state["compute_endpoints"]["sophia"]
        function = client.register_function(noop)
        auth = globus_sdk.ConfidentialAppAuthClient(
            state["compute_client_id"], state["compute_client_secret"]
        )
        grant = auth.oauth2_client_credentials_tokens(requested_scopes=ComputeScopes.all)
        token = grant.data["access_token"]
        http = httpx.Client(
            base_url=state["globus_compute_url"], headers={"Authorization": f"Bearer {token}"}
        )

        def run() -> str:
            return str(client.run(endpoint_id=endpoint, function_id=function))

        def until_done() -> None:
            task_id = run()
            while client.get_task(task_id)["pending"]:
                time.sleep(0.002)

        finished = run()
        while client.get_task(finished)["pending"]:
            time.sleep(0.01)
        body = client.create_batch()
        body.add(function, (), {})
        payload = body.prepare()
        calls: dict[str, Callable[[], Any]] = {
            "SDK run (submit)": run,
            "SDK v2.get_task (finished)": lambda: client._compute_web_client.v2.get_task(finished),
            "SDK get_endpoint_status": lambda: client.get_endpoint_status(endpoint),
            "HTTP POST submit": lambda: http.post(
                f"/v3/endpoints/{endpoint}/submit", json=payload
            ).raise_for_status(),
            "HTTP GET task": lambda: http.get(f"/v2/tasks/{finished}").raise_for_status(),
            "HTTP GET endpoint status": lambda: http.get(
                f"/v2/endpoints/{endpoint}/status"
            ).raise_for_status(),
            "task: submit → seen done": until_done,
        }
        for call in calls.values():
            for _ in range(args.warmup):
                call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.calls):
            for name, call in calls.items():
                times[name].append(timed(call))

    print(f"machine: {machine()}")
    print(f"{args.calls} calls each, interleaved, after {args.warmup} warm-up each")
    for name, values in times.items():
        s = summary(values)
        print(f"{name:28s} median {s['median_ms']:6.2f} ms   p95 {s['p95_ms']:6.2f} ms")


if __name__ == "__main__":
    main()
