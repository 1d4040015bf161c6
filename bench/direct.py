"""Added latency of the direct path (issue 18): a direct backend's request through the gateway
against the same request sent straight to its upstream, side by side in one run.

The local stack's direct backend (`openai/gpt-oss-20b`, cluster `direct`) is the stack's own mock
upstream at zero delay. N non-streamed chat requests go to the upstream and N through the gateway,
interleaved so machine noise falls on both alike (median, p95); then N streamed ones each way
(time to first token and total). Every gateway request is authenticated, rate limited and written
(its record, its usage record, its reservation settled) before its answer is sent.

    .venv/bin/python -m bench.direct [--requests 200] [--stream-tokens 32] [--no-rate-limits]

`--no-rate-limits` turns the default per-user limits off (FIRST_DEFAULT_*=0: no counter is
taken or settled), to show what the rate-limit counters cost on the local moto.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Iterator

import openai

from bench.common import local_stack, machine, summary, timed_chat

MODEL = "openai/gpt-oss-20b"
MESSAGES = [{"role": "user", "content": "Give me one sentence about HPC."}]
USERS = ("alice", "dave")  # dev identities the local stack serves
# The default limit is 20 requests a second per user: with two users alternating, a round of the
# loop takes at least this long (each user's requests ~60 ms apart), so no request is refused.
ROUND_SECONDS = 0.03


def paced(rounds: int) -> Iterator[int]:
    """range(rounds), each round taking at least ROUND_SECONDS (the pause is not measured)."""
    for i in range(rounds):
        started = time.perf_counter()
        yield i
        time.sleep(max(0.0, ROUND_SECONDS - (time.perf_counter() - started)))


def non_streamed(client: openai.OpenAI, phases: list[dict[str, float]] | None = None) -> float:
    # The gateway's phases (Server-Timing): auth, submit, upstream, record.
    return timed_chat(client, MODEL, MESSAGES, phases)


def streamed(client: openai.OpenAI, tokens: int) -> tuple[float, float]:
    """Time to the first content token, and to the end of the stream."""
    start = time.perf_counter()
    first = None
    for chunk in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=tokens, stream=True
    ):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    return first or float("nan"), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--stream-tokens", type=int, default=32)
    parser.add_argument("--no-rate-limits", action="store_true")
    args = parser.parse_args()
    if args.no_rate_limits:  # the stack's gateway inherits this process's environment
        os.environ["FIRST_DEFAULT_REQUESTS_PER_SECOND_PER_USER"] = "0"
        os.environ["FIRST_DEFAULT_TOKENS_PER_MINUTE_PER_USER"] = "0"

    from first_local.globus_standin import mint_token
    from first_local.stack import DIRECT_DEV_KEY

    # Background work off: the poller and the reconciler would share the two cores.
    with local_stack("--health-every", "0", "--reconcile-every", "0") as state:
        upstream = openai.OpenAI(
            base_url=state["direct_url"], api_key=DIRECT_DEV_KEY, max_retries=0
        )
        # Two users in turn: back to back, one user would pass the default 20 requests/s.
        gateways = [
            openai.OpenAI(
                base_url=f"{state['base_url']}/v1", api_key=mint_token(user), max_retries=0
            )
            for user in USERS
        ]
        for i in paced(args.warmup):
            non_streamed(upstream)
            non_streamed(gateways[i % 2])
            streamed(upstream, args.stream_tokens)
            streamed(gateways[i % 2], args.stream_tokens)
        upstream_times, gateway_times = [], []
        phases: list[dict[str, float]] = []
        for i in paced(args.requests):
            upstream_times.append(non_streamed(upstream))
            gateway_times.append(non_streamed(gateways[i % 2], phases))
        upstream_streams, gateway_streams = [], []
        for i in paced(args.requests):
            upstream_streams.append(streamed(upstream, args.stream_tokens))
            gateway_streams.append(streamed(gateways[i % 2], args.stream_tokens))

    u, g = summary(upstream_times), summary(gateway_times)
    print(f"machine: {machine()}")
    print(f"requests: {args.requests} each way, interleaved, after {args.warmup} warm-up each")
    if args.no_rate_limits:
        print("rate limits: off (no counter taken or settled)")
    print("non-streamed chat (max_tokens 32):")
    print(f"  upstream directly : median {u['median_ms']:7.2f} ms   p95 {u['p95_ms']:7.2f} ms")
    print(f"  through the gateway: median {g['median_ms']:7.2f} ms   p95 {g['p95_ms']:7.2f} ms")
    print(
        f"  added: median {g['median_ms'] - u['median_ms']:7.2f} ms   "
        f"p95 {g['p95_ms'] - u['p95_ms']:7.2f} ms"
    )
    medians = {name: statistics.median(p[name] for p in phases) for name in phases[0]}
    inside = ", ".join(f"{name} {ms:.1f}" for name, ms in medians.items())
    print(f"  inside the gateway (median ms): {inside}")
    print(f"streamed chat ({args.stream_tokens} tokens):")
    for name, which in (("time to first token", 0), ("total", 1)):
        us = summary([s[which] for s in upstream_streams])
        gs = summary([s[which] for s in gateway_streams])
        print(
            f"  {name:20}: upstream median {us['median_ms']:7.2f} p95 {us['p95_ms']:7.2f} | "
            f"gateway median {gs['median_ms']:7.2f} p95 {gs['p95_ms']:7.2f} | added median "
            f"{gs['median_ms'] - us['median_ms']:6.2f} p95 {gs['p95_ms'] - us['p95_ms']:6.2f} ms"
        )


if __name__ == "__main__":
    main()
