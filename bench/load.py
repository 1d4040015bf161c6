"""A bounded load run on loopback: nothing accepted is lost, and the tokens add up.

Starts the local stack (`first-gateway dev --workers 4`) and sends N chat requests (half
streamed, `max_tokens` 16-32) with C at a time from a thread pool, through the real `openai`
package, spread over the dev users alice and dave and two models. Submissions are paced so that
no user sends more than ~15 requests/s to one model (the local limit is 20); a 429 that happens
anyway is counted apart ("refused, nothing submitted"). Every request has a timeout, and the
whole run a time bound. Afterwards it reads the tables (boto3 on the stack's moto server) and
checks that every request id the clients saw (`x-first-request-id`) has exactly one request
record in a terminal state and exactly one usage record, and that the usage records' tokens add
up to what the clients were told. Prints throughput, p50/p95/p99 latency and the checks; exits
non-zero if a check fails.

    .venv/bin/python -m bench.load [--requests 300] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import boto3
import openai
from openai.types.chat import ChatCompletionMessageParam

from bench.common import machine, percentile

USERS = ("alice", "dave")
MODELS = ("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3.1-70B-Instruct")
TERMINAL = frozenset({"completed", "failed", "cancelled", "timed_out"})
TABLE_PREFIX = "first-local-"


@dataclass
class Outcome:
    index: int
    user: str
    model: str
    stream: bool
    kind: str = "pending"  # ok, refused (429), error (accepted, then an error), failed, timeout
    request_id: str | None = None
    total_tokens: int | None = None  # what the client was told (usage), if it was
    total_s: float | None = None
    first_token_s: float | None = None
    detail: str = ""


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    wall_s: float
    outcomes: list[Outcome]
    timed_out_run: bool = False

    def counts(self) -> Counter[str]:
        return Counter(o.kind for o in self.outcomes)

    def seen(self) -> dict[str, Outcome]:
        return {o.request_id: o for o in self.outcomes if o.request_id}


@dataclass
class TableCheck:
    seen: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    missing_record: list[str] = field(default_factory=list)
    not_terminal: list[str] = field(default_factory=list)
    usage_count_wrong: dict[str, int] = field(default_factory=dict)
    duplicate_ids: int = 0
    client_tokens: int = 0
    table_tokens: int = 0  # usage records of the ids whose client got a usage
    unanswered_table_tokens: int = 0  # usage records of accepted ids the client got no usage for
    settle_s: float = 0.0

    @property
    def tokens_match(self) -> bool:
        return self.client_tokens == self.table_tokens

    @property
    def ok(self) -> bool:
        return (
            not self.missing_record
            and not self.not_terminal
            and not self.usage_count_wrong
            and not self.duplicate_ids
            and self.tokens_match
        )


def user_sub(user: str) -> str:
    from first_local.globus_standin import DEV_IDENTITIES

    return DEV_IDENTITIES[user].sub


def _plan(requests: int) -> list[Outcome]:
    """Round-robin over (user, model); streamed and not alternate within each pair."""
    pairs = [(u, m) for u in USERS for m in MODELS]
    return [
        Outcome(i, *pairs[i % len(pairs)], stream=(i // len(pairs)) % 2 == 1)
        for i in range(requests)
    ]


def _send(client: openai.OpenAI, outcome: Outcome) -> None:
    max_tokens = 16 + outcome.index % 17  # 16..32
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": f"Load test request {outcome.index}: say something."}
    ]
    start = time.perf_counter()
    try:
        if outcome.stream:
            raw = client.chat.completions.with_raw_response.create(
                model=outcome.model,
                messages=messages,
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
            outcome.request_id = raw.headers.get("x-first-request-id")
            usage = None
            for chunk in raw.parse():
                if outcome.first_token_s is None and any(
                    c.delta and c.delta.content for c in chunk.choices
                ):
                    outcome.first_token_s = time.perf_counter() - start
                if chunk.usage is not None:
                    usage = chunk.usage
            outcome.total_s = time.perf_counter() - start
        else:
            raw_reply = client.chat.completions.with_raw_response.create(
                model=outcome.model,
                messages=messages,
                max_tokens=max_tokens,
            )
            outcome.request_id = raw_reply.headers.get("x-first-request-id")
            usage = raw_reply.parse().usage
            outcome.total_s = time.perf_counter() - start
        if usage is None:
            outcome.kind, outcome.detail = "error", "no usage in the answer"
        else:
            outcome.kind, outcome.total_tokens = "ok", int(usage.total_tokens)
    except openai.APIStatusError as exc:
        outcome.request_id = outcome.request_id or exc.response.headers.get("x-first-request-id")
        if exc.status_code == 429 and not outcome.request_id:
            outcome.kind = "refused"
        else:
            outcome.kind = "error" if outcome.request_id else "failed"
        outcome.detail = f"{exc.status_code}: {exc.message}"[:200]
    except openai.APITimeoutError as exc:
        outcome.kind, outcome.detail = "timeout", str(exc)[:200]
    except openai.APIError as exc:
        outcome.kind = "error" if outcome.request_id else "failed"
        outcome.detail = f"{type(exc).__name__}: {exc}"[:200]


def run_load(
    base_url: str,
    *,
    requests: int = 300,
    concurrency: int = 50,
    per_pair_rps: float = 15.0,
    request_timeout: float = 60.0,
    run_timeout: float = 300.0,
    warmup: int = 1,
) -> LoadResult:
    """Send the planned requests; each (user, model) pair's n-th request is not sent before
    n / per_pair_rps seconds from the start. Returns when all are done or the run's bound."""
    from first_local.globus_standin import mint_token

    clients = {
        user: openai.OpenAI(
            base_url=f"{base_url}/v1",
            api_key=mint_token(user),
            max_retries=0,
            timeout=request_timeout,
        )
        for user in USERS
    }
    # Warm-up, not counted: one request per (user, model), so the first measured requests do
    # not pay the first token introspection and connection setup of each process.
    for i, warm in enumerate(_plan(len(USERS) * len(MODELS) * warmup)):
        warm.index = i
        _send(clients[warm.user], warm)
    plan = _plan(requests)
    pairs = len(USERS) * len(MODELS)
    stop = threading.Event()
    start = time.perf_counter()

    def job(outcome: Outcome) -> None:
        due = start + (outcome.index // pairs) / per_pair_rps
        delay = due - time.perf_counter()
        if delay > 0 and stop.wait(delay):
            outcome.kind = "not sent"
            return
        if stop.is_set():
            outcome.kind = "not sent"
            return
        _send(clients[outcome.user], outcome)

    timed_out = False
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="load")
    try:
        futures: set[Future[None]] = {executor.submit(job, o) for o in plan}
        deadline = start + run_timeout
        while futures:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                timed_out = True
                break
            _, futures = wait(futures, timeout=remaining, return_when=FIRST_COMPLETED)
    finally:
        stop.set()
        executor.shutdown(wait=not timed_out, cancel_futures=True)
        for client in clients.values():
            client.close()
    wall = time.perf_counter() - start
    return LoadResult(requests, concurrency, wall, plan, timed_out_run=timed_out)


def _dynamodb(aws_endpoint_url: str) -> Any:
    # The local moto server takes any credentials; these are its usual placeholders.
    return boto3.resource(
        "dynamodb",
        endpoint_url=aws_endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _request_statuses(dynamodb: Any, ids: list[str]) -> dict[str, str]:
    name = f"{TABLE_PREFIX}requests"
    found: dict[str, str] = {}
    for i in range(0, len(ids), 100):
        keys: dict[str, Any] = {
            name: {
                "Keys": [{"request_id": rid} for rid in ids[i : i + 100]],
                "ConsistentRead": True,
                "ProjectionExpression": "request_id, #s",
                "ExpressionAttributeNames": {"#s": "status"},
            }
        }
        while keys:
            response = dynamodb.batch_get_item(RequestItems=keys)
            for item in response["Responses"].get(name, []):
                found[str(item["request_id"])] = str(item["status"])
            keys = response.get("UnprocessedKeys") or {}
    return found


def _usage_rows(dynamodb: Any, users: Iterable[str], ids: set[str]) -> list[dict[str, Any]]:
    table = dynamodb.Table(f"{TABLE_PREFIX}usage")
    rows: list[dict[str, Any]] = []
    for user in users:
        query: dict[str, Any] = {
            "KeyConditionExpression": "user_id = :u",
            "ExpressionAttributeValues": {":u": user_sub(user)},
            "ConsistentRead": True,
        }
        while True:
            response = table.query(**query)
            rows.extend(r for r in response["Items"] if r.get("request_id") in ids)
            if "LastEvaluatedKey" not in response:
                break
            query["ExclusiveStartKey"] = response["LastEvaluatedKey"]
    return rows


def check_tables(
    result: LoadResult, aws_endpoint_url: str, *, settle_timeout: float = 30.0
) -> TableCheck:
    """Read the tables until every seen id has a terminal record and a usage record (or the
    bound runs out), then check: one terminal state, one usage record, tokens add up."""
    dynamodb = _dynamodb(aws_endpoint_url)
    seen = result.seen()
    ids = sorted(seen)
    all_ids = [o.request_id for o in result.outcomes if o.request_id]
    start = time.monotonic()
    while True:
        statuses = _request_statuses(dynamodb, ids)
        rows = _usage_rows(dynamodb, USERS, set(ids))
        per_id = Counter(str(r["request_id"]) for r in rows)
        settled = all(statuses.get(i) in TERMINAL for i in ids) and all(per_id[i] >= 1 for i in ids)
        if settled or time.monotonic() - start > settle_timeout:
            break
        time.sleep(0.5)
    check = TableCheck(seen=len(ids), settle_s=time.monotonic() - start)
    check.duplicate_ids = len(all_ids) - len(ids)
    check.statuses = Counter(statuses.get(i, "(no record)") for i in ids)
    check.missing_record = [i for i in ids if i not in statuses]
    check.not_terminal = [i for i in ids if i in statuses and statuses[i] not in TERMINAL]
    check.usage_count_wrong = {i: per_id[i] for i in ids if per_id[i] != 1}
    for row in rows:
        tokens = int(row.get("total_tokens") or 0)
        outcome = seen[str(row["request_id"])]
        if outcome.total_tokens is not None:
            check.table_tokens += tokens
        else:
            check.unanswered_table_tokens += tokens
    check.client_tokens = sum(o.total_tokens or 0 for o in seen.values())
    return check


def _ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        " / ".join(f"{percentile(values, q) * 1000:.0f}" for q in (0.50, 0.95, 0.99))
        + f" ms (n={len(values)})"
    )


def report(result: LoadResult, check: TableCheck) -> list[str]:
    ok = [o for o in result.outcomes if o.kind == "ok"]
    plain = [o.total_s for o in ok if not o.stream and o.total_s is not None]
    ttft = [o.first_token_s for o in ok if o.stream and o.first_token_s is not None]
    streamed = [o.total_s for o in ok if o.stream and o.total_s is not None]
    counts = result.counts()
    terminal_bad = bool(check.missing_record or check.not_terminal)
    lines = [
        f"machine: {machine()}",
        f"requests: {result.requests}, concurrency {result.concurrency}, "
        f"users {'+'.join(USERS)}, models {len(MODELS)}, half streamed, max_tokens 16-32",
        f"wall time: {result.wall_s:.2f} s{' (RUN BOUND HIT)' if result.timed_out_run else ''}",
        f"throughput: {len(ok) / result.wall_s:.1f} answered requests/s "
        f"({sum(1 for o in result.outcomes if o.kind != 'not sent') / result.wall_s:.1f} sent/s)",
        f"non-streamed total      p50/p95/p99: {_ms(plain)}",
        f"streamed first token    p50/p95/p99: {_ms(ttft)}",
        f"streamed total          p50/p95/p99: {_ms(streamed)}",
        "outcomes: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + (" (refused = 429, nothing submitted)" if counts.get("refused") else ""),
    ]
    details = Counter(o.detail for o in result.outcomes if o.kind not in ("ok", "refused"))
    lines += [f"  {n} x {d}" for d, n in details.most_common(5)]
    lines += [
        f"table check (settled in {check.settle_s:.1f} s): {check.seen} accepted ids seen; "
        f"statuses: {dict(check.statuses)}",
        f"  exactly one terminal state: {'FAIL' if terminal_bad else 'OK'}"
        f" (no record {len(check.missing_record)}, not terminal {len(check.not_terminal)}, "
        f"ids seen twice {check.duplicate_ids})",
        f"  exactly one usage record: {'OK' if not check.usage_count_wrong else 'FAIL'}"
        f" (wrong count for {len(check.usage_count_wrong)})",
        f"  total_tokens: clients {check.client_tokens}, usage table {check.table_tokens}: "
        f"{'OK' if check.tokens_match else 'FAIL'}"
        + (
            f" (+{check.unanswered_table_tokens} in records of accepted requests whose client got "
            "no usage)"
            if check.unanswered_table_tokens
            else ""
        ),
        f"checks: {'PASS' if check.ok else 'FAIL'}",
    ]
    return lines


def compute_lines(before: dict[str, Any], after: dict[str, Any], answered: int) -> list[str]:
    """What the Globus Compute stand-in saw during the run."""
    submits = "POST /v3/endpoints/{endpoint_id}/submit"
    calls = after["total"] - before["total"]
    sent = after["routes"].get(submits, 0) - before["routes"].get(submits, 0)
    busiest = after["busiest_window"]
    return [
        f"Globus Compute (stand-in, limit {after['limit']}): {calls} API calls, {sent} submits "
        f"for {after['tasks'] - before['tasks']} tasks ({sent / max(answered, 1):.2f} submits "
        f"per answered request), {after['throttled'] - before['throttled']} answered 429; "
        f"busiest {busiest['seconds']:g} s of the whole stack's life: {busiest['calls']} calls",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--per-pair-rps", type=float, default=15.0)
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--run-timeout", type=float, default=300.0)
    parser.add_argument(
        "--compute-api-limit",
        default="0",
        help="Globus Compute's API limit on the stand-in (N/S; default 0: none)",
    )
    parser.add_argument(
        "--one-call-per-request",
        action="store_true",
        help="no API budget and no submit queue: every request submits at once and the SDK "
        "retries what the service refuses (how the gateway worked before batching)",
    )
    args = parser.parse_args()

    import json
    import urllib.request

    from first_local.stack import stack_process

    env = {"FIRST_TABLE_PREFIX": TABLE_PREFIX}
    if args.one_call_per_request:
        env["FIRST_COMPUTE_API_CALLS_PER_WINDOW"] = "0"
    options = ("--workers", "4", "--compute-api-limit", args.compute_api_limit)
    with stack_process(*options, env=env) as state:
        calls_url = f"{state['globus_compute_url']}/_standin/calls"
        before = json.load(urllib.request.urlopen(calls_url))
        result = run_load(
            state["base_url"],
            requests=args.requests,
            concurrency=args.concurrency,
            per_pair_rps=args.per_pair_rps,
            request_timeout=args.request_timeout,
            run_timeout=args.run_timeout,
        )
        after = json.load(urllib.request.urlopen(calls_url))
        check = check_tables(result, state["aws_endpoint_url"])
    answered = sum(1 for o in result.outcomes if o.kind == "ok")
    way = "one call per request" if args.one_call_per_request else "budget + submit queue"
    print(f"submission: {way}")
    print("\n".join(report(result, check) + compute_lines(before, after, answered)))
    if not check.ok or result.timed_out_run:
        sys.exit(1)


if __name__ == "__main__":
    main()
