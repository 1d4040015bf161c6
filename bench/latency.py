"""Added latency of the gateway on a non-streaming chat request.

In one run, the same request is sent N times straight to the mock vLLM and N times through the
gateway on the local stack (mock at zero delay), interleaved so that machine noise falls on
both alike. Prints median and p95 of each, the added median and the ratio.

    .venv/bin/python -m bench.latency [--requests 200]
"""

from __future__ import annotations

import argparse
import statistics

import openai

from bench.common import local_stack, machine, summary, timed_chat

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
MESSAGES = [{"role": "user", "content": "Give me one sentence about HPC."}]


def timed(client: openai.OpenAI, phases: list[dict[str, float]] | None = None) -> float:
    # The gateway's phases (Server-Timing): auth, submit, wait.
    return timed_chat(client, MODEL, MESSAGES, phases)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    from first_local.globus_standin import mint_token

    with local_stack() as state:
        direct = openai.OpenAI(base_url=state["backend_url"], api_key="unused", max_retries=0)
        gateway = openai.OpenAI(
            base_url=f"{state['base_url']}/v1", api_key=mint_token("alice"), max_retries=0
        )
        for _ in range(args.warmup):
            timed(direct)
            timed(gateway)
        direct_times, gateway_times = [], []
        phases: list[dict[str, float]] = []
        for _ in range(args.requests):
            direct_times.append(timed(direct))
            gateway_times.append(timed(gateway, phases))

    d, g = summary(direct_times), summary(gateway_times)
    print(f"machine: {machine()}")
    print(f"requests: {args.requests} each, interleaved, after {args.warmup} warm-up each")
    print(f"direct to mock vLLM : median {d['median_ms']:7.2f} ms   p95 {d['p95_ms']:7.2f} ms")
    print(f"through the gateway : median {g['median_ms']:7.2f} ms   p95 {g['p95_ms']:7.2f} ms")
    print(
        f"added median latency: {g['median_ms'] - d['median_ms']:7.2f} ms   "
        f"(p95 {g['p95_ms'] - d['p95_ms']:.2f} ms); ratio {g['median_ms'] / d['median_ms']:.2f}x"
    )
    medians = {name: statistics.median(p[name] for p in phases) for name in phases[0]}
    inside = ", ".join(f"{name} {ms:.1f}" for name, ms in medians.items())
    print(f"inside the gateway (median ms): {inside}")


if __name__ == "__main__":
    main()
