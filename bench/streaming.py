"""Streaming through the gateway versus straight from the mock vLLM, in one run.

For a 500-token answer at a fixed token rate: time to first token, mean gap between tokens and
total time, direct and through the gateway, interleaved. Then the most one stream carries when
the mock has no delay (tokens per second through the gateway).

    .venv/bin/python -m bench.streaming [--rounds 5] [--rate 200]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import openai

from bench.common import local_stack, machine

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


def stream(client: openai.OpenAI, prompt: str) -> tuple[float, float, float, int]:
    """(time to first token, mean inter-token gap, total time, tokens) of one streamed answer."""
    start = time.perf_counter()
    arrivals = []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
    total = time.perf_counter() - start
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return arrivals[0] - start, statistics.fmean(gaps), total, len(arrivals)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=int, default=200, help="mock tokens per second")
    parser.add_argument("--tokens", type=int, default=500)
    args = parser.parse_args()

    from first_local.globus_standin import mint_token

    paced = f"Explain batching. [mock:tokens={args.tokens}] [mock:rate={args.rate}]"
    with local_stack() as state:
        direct = openai.OpenAI(base_url=state["backend_url"], api_key="unused", max_retries=0)
        gateway = openai.OpenAI(
            base_url=f"{state['base_url']}/v1", api_key=mint_token("alice"), max_retries=0
        )
        stream(direct, paced)
        stream(gateway, paced)
        runs: dict[str, list[tuple[float, float, float, int]]] = {"direct": [], "gateway": []}
        for _ in range(args.rounds):
            runs["direct"].append(stream(direct, paced))
            runs["gateway"].append(stream(gateway, paced))
        fast = "Explain batching at full speed. [mock:tokens=8000]"
        stream(gateway, fast)
        throughput = [stream(gateway, fast) for _ in range(3)]
        direct_throughput = [stream(direct, fast) for _ in range(3)]

    print(f"machine: {machine()}")
    print(f"{args.rounds} rounds, interleaved; {args.tokens} tokens at {args.rate} tokens/s")
    medians = {}
    for name, values in runs.items():
        ttft, gap, total = (statistics.median(v[i] for v in values) for i in range(3))
        medians[name] = (ttft, gap, total)
        print(
            f"{name:8s}: first token {ttft * 1000:7.1f} ms  mean gap {gap * 1000:6.2f} ms  "
            f"total {total:6.3f} s  tokens {values[0][3]}"
        )
    (dt, dg, dT), (gt, gg, gT) = medians["direct"], medians["gateway"]
    print(
        f"added   : first token {(gt - dt) * 1000:+7.1f} ms  mean gap {(gg - dg) * 1000:+6.2f} ms  "
        f"total {(gT / dT - 1) * 100:+.1f} %"
    )
    for name, values in (("gateway", throughput), ("direct", direct_throughput)):
        rate = statistics.median(v[3] / v[2] for v in values)
        print(f"no-delay stream, {name:7s}: {rate:8.0f} tokens/s ({values[0][3]} tokens)")


if __name__ == "__main__":
    main()
