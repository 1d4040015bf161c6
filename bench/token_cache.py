"""The token cache: calls to Globus per request, warm and cold (issue 4).

Starts the local stack, then, reading the Globus stand-in's call counters around each step:

(a) through the gateway: one request with a fresh token (cold: introspection, dependent token,
    Groups), then N requests with the same token (warm: must make ZERO calls to Globus), then
    one request with a second token of the same user (groups cached per user: one
    introspection, no dependent token, no Groups call);
(b) a cold function instance with a populated DynamoDB cache: a fresh `Authenticator` built in
    THIS process (empty memory), pointed at the stack's moto server and the stand-in, given the
    same token (must make ZERO calls), then a third token of the same user (one introspection,
    groups from the table).

    .venv/bin/python -m bench.token_cache [--requests 50] [--cold 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import urllib.request
from typing import Any
from urllib.parse import urlparse

import openai
from openai.types.chat import ChatCompletionMessageParam

from bench.common import local_stack, machine

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
KINDS = ("introspect", "dependent_tokens", "my_groups")


def counters(state: dict[str, Any]) -> dict[str, int]:
    with urllib.request.urlopen(state["standin_calls_url"]) as response:
        data = json.load(response)
    return {kind: int(data.get(kind, 0)) for kind in KINDS}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {kind: after[kind] - before[kind] for kind in KINDS}


def show(d: dict[str, int]) -> str:
    return ", ".join(f"{kind} {d[kind]}" for kind in KINDS)


def request(client: openai.OpenAI) -> tuple[float, float]:
    """(total ms, the gateway's own auth phase ms from Server-Timing)."""
    start = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=4
    )
    total = (time.perf_counter() - start) * 1000
    raw.parse()
    phases = dict(part.strip().split(";dur=") for part in raw.headers["server-timing"].split(","))
    return total, float(phases["auth"])


def cold_instance_env(state: dict[str, Any]) -> None:
    """This process's settings = the running gateway's (the same code builds both)."""
    from first_local.stack import LocalStack, StackOptions

    stack = LocalStack(StackOptions())
    stack.moto_port = int(urlparse(state["aws_endpoint_url"]).port or 0)
    stack.auth_port = int(urlparse(state["globus_auth_url"]).port or 0)
    os.environ.update(stack.gateway_env())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--cold", type=int, default=5, help="cold instances per case in (b)")
    args = parser.parse_args()

    from first_local.globus_standin import mint_token

    def client(token: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{state['base_url']}/v1", api_key=token, max_retries=0)

    started = time.monotonic()
    with local_stack() as state:
        token = mint_token("alice")
        gateway = client(token)

        # (a) through the gateway
        before = counters(state)
        cold_total, cold_auth = request(gateway)
        cold_calls = delta(before, counters(state))

        before = counters(state)
        warm = [request(gateway) for _ in range(args.requests)]
        warm_calls = delta(before, counters(state))

        before = counters(state)
        _, second_auth = request(client(mint_token("alice")))
        second_calls = delta(before, counters(state))

        # (b) a cold instance (empty memory) reading the populated DynamoDB cache
        cold_instance_env(state)
        from first_core.auth import Authenticator

        def timed_cold(tokens: list[str]) -> tuple[list[float], dict[str, int]]:
            """A new Authenticator (empty memory) per token; ms each, and the calls made."""
            before = counters(state)
            times = []
            for each in tokens:
                t0 = time.perf_counter()
                caller = Authenticator().authenticate(f"Bearer {each}")
                times.append((time.perf_counter() - t0) * 1000)
                assert caller.username.endswith(("@anl.gov", "@uchicago.edu")), caller
            return times, delta(before, counters(state))

        # The first one in this process also creates the DynamoDB client, as a cold start does.
        first_ms, first_calls = timed_cold([token])
        table_ms, table_calls = timed_cold([token] * args.cold)
        new_token_ms, new_token_calls = timed_cold([mint_token("alice") for _ in range(args.cold)])
        # for scale: users nobody has seen yet (every call to Globus)
        uncached_ms, uncached_calls = timed_cold([mint_token("dave"), mint_token("bob")])
    elapsed = time.monotonic() - started

    warm_total = statistics.median(w[0] for w in warm)
    warm_auth = statistics.median(w[1] for w in warm)
    print(f"machine: {machine()}")
    print("(a) through the gateway (calls to the Globus stand-in; auth = Server-Timing)")
    print(
        f"  cold, fresh token        : {show(cold_calls)}; auth {cold_auth:.1f} ms, "
        f"request {cold_total:.1f} ms"
    )
    print(
        f"  warm, same token x{args.requests:<5} : {show(warm_calls)}; auth median "
        f"{warm_auth:.2f} ms, request median {warm_total:.1f} ms"
    )
    print(f"  second token, same user  : {show(second_calls)}; auth {second_auth:.1f} ms")
    print("(b) a cold instance (new Authenticator, empty memory) on the populated DynamoDB cache")
    med = statistics.median
    print(
        f"  same token, first in the process (+ DynamoDB client setup): {show(first_calls)}; "
        f"authenticate {first_ms[0]:.1f} ms"
    )
    print(
        f"  same token x{args.cold} (a new instance each) : {show(table_calls)}; authenticate "
        f"median {med(table_ms):.1f} ms"
    )
    print(
        f"  new token, same user x{args.cold}             : {show(new_token_calls)}; "
        f"authenticate median {med(new_token_ms):.1f} ms"
    )
    print(
        f"  unseen users x2 (no cache at all)  : {show(uncached_calls)}; authenticate "
        f"median {med(uncached_ms):.1f} ms"
    )
    print(f"wall time {elapsed:.1f} s")
    failures = [
        name
        for name, got, want in (
            ("warm", warm_calls, (0, 0, 0)),
            ("cold instance, same token", first_calls, (0, 0, 0)),
            ("cold instances, same token", table_calls, (0, 0, 0)),
            ("second token", second_calls, (1, 0, 0)),
            ("cold instances, new tokens", new_token_calls, (args.cold, 0, 0)),
        )
        if tuple(got[k] for k in KINDS) != want
    ]
    if failures:
        raise SystemExit(f"unexpected calls to Globus: {', '.join(failures)}")


if __name__ == "__main__":
    main()
