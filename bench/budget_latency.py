"""What the Globus Compute API budget costs a lone request: nothing but its one DynamoDB update.

Starts two local stacks with the service's limit (`--compute-api-limit 20/10`, no health poller,
no reconciler): A with the gateway's budget and submit queue (the default), B without
(`FIRST_COMPUTE_API_CALLS_PER_WINDOW=0`: every request submits at once, as before batching).
Sends N chat requests to each, alternating, a pause between pairs so that A's budget always has
a unit (low load): every request of A should be submitted at once, none queued. Prints the
medians, the difference, and how many of A's requests went through the queue (records with
`queued_at`, read from A's tables).

    .venv/bin/python -m bench.budget_latency [--requests 60] [--pause 1.1]
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack

import boto3
import openai

from bench.common import machine, summary
from bench.latency import timed

OPTIONS = ("--workers", "2", "--compute-api-limit", "20/10", "--health-every", "0")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--pause", type=float, default=1.1)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    from first_local.globus_standin import mint_token
    from first_local.stack import stack_process

    with ExitStack() as stacks:
        budgeted = stacks.enter_context(stack_process(*OPTIONS, "--reconcile-every", "0"))
        unbudgeted = stacks.enter_context(
            stack_process(
                *OPTIONS,
                "--reconcile-every",
                "0",
                env={"FIRST_COMPUTE_API_CALLS_PER_WINDOW": "0"},
            )
        )
        clients = [
            openai.OpenAI(
                base_url=f"{state['base_url']}/v1", api_key=mint_token("alice"), max_retries=0
            )
            for state in (budgeted, unbudgeted)
        ]
        for _ in range(args.warmup):
            for client in clients:
                timed(client)
                time.sleep(args.pause)
        times: list[list[float]] = [[], []]
        phases: list[list[dict[str, float]]] = [[], []]
        for _ in range(args.requests):
            for index, client in enumerate(clients):
                times[index].append(timed(client, phases[index]))
            time.sleep(args.pause)
        requests = boto3.resource(
            "dynamodb",
            endpoint_url=budgeted["aws_endpoint_url"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).Table("first-local-requests")
        items = requests.scan(ConsistentRead=True)["Items"]
        queued = sum(1 for item in items if "queued_at" in item)

    a, b = summary(times[0]), summary(times[1])
    submit = [sorted(p["submit"] for p in ps)[len(ps) // 2] for ps in phases]
    print(f"machine: {machine()}")
    print(f"{args.requests} requests to each, alternating, {args.pause} s between pairs")
    print(f"budget + queue  : median {a['median_ms']:7.2f} ms  p95 {a['p95_ms']:7.2f} ms")
    print(f"at once, no budget: median {b['median_ms']:7.2f} ms  p95 {b['p95_ms']:7.2f} ms")
    print(f"the budget adds : median {a['median_ms'] - b['median_ms']:+.2f} ms "
          f"(submit phase {submit[0]:.1f} vs {submit[1]:.1f} ms)")
    print(f"requests of the budgeted stack that waited in the queue: {queued} of {len(items)}")


if __name__ == "__main__":
    main()
