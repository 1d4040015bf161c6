"""What a request costs on AWS, from what it is counted doing on the local stack.

Starts the local stack with metrics on and nothing in the background (`--reconcile-every 0
--health-every 0`), Globus Compute's limit at the service's 20/10 (the gateway's budget on),
and for each kind of work records, from outside:

- DynamoDB, SQS and S3 calls, with moto's own recorder on the stack's moto server (every
  request it served, by `X-Amz-Target` or S3 method);
- Globus Compute API calls, from the stand-in's `/_standin/calls`;
- Lambda time: the proxy's from the client's own wall time (the proxy function is alive until
  the answer or the stream's end), callbacks' from the control plane's `CallbackMs` metric
  lines, the submitter's from its log lines, and invocations of each.

Kinds: a non-streamed chat request and a streamed one, alone (each submitted at once), the same
40 at once (most wait in the submit queue and go in batches), and one line of a 200-line batch.
It prints the counts per request and the cost per million requests at the list prices below
(us-east-1, x86, on-demand; an input, not a measurement: edit them to price elsewhere).

    .venv/bin/python -m bench.cost [--requests 20] [--burst 40] [--batch-lines 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from bench.common import machine
from first_local.moto_server import WRITE_OPERATIONS

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
# A burst spreads over two users and two models: the per-user limit (20/s a model) is not its
# subject.
BURST_MODELS = (MODEL, "meta-llama/Meta-Llama-3.1-70B-Instruct")
MESSAGES: Any = [{"role": "user", "content": "One sentence about HPC, please."}]

# USD. DynamoDB on demand per request unit (an item read of up to 4 KB, strongly consistent, or
# written of up to 1 KB: the gateway's items are), SQS standard per request, S3 per request,
# API Gateway REST per request, Lambda per GB-second (x86) and per invocation.
PRICES = {
    "dynamodb_read": 0.125e-6,
    "dynamodb_write": 0.625e-6,
    "sqs_request": 0.40e-6,
    "s3_put": 0.005e-3,
    "s3_get": 0.0004e-3,
    "api_gateway_request": 3.50e-6,
    "lambda_gb_second": 0.0000166667,
    "lambda_invocation": 0.20e-6,
}
PROXY_GB = 1.0  # template.yaml: ProxyFunction MemorySize 1024
CONTROL_GB = 0.5  # ControlPlaneFunction and SubmitterFunction: 512
READS = {"GetItem", "Query", "Scan", "BatchGetItem"}
@dataclass
class Tally:
    """What one kind of work did, in all."""

    units: int  # requests (or batch lines)
    dynamodb: Counter[str] = field(default_factory=Counter)
    sqs: Counter[str] = field(default_factory=Counter)
    s3: Counter[str] = field(default_factory=Counter)
    compute_calls: int = 0
    proxy_seconds: float = 0.0
    proxy_invocations: int = 0
    callback_ms: float = 0.0
    callbacks: int = 0
    submitter_ms: float = 0.0
    submitter_invocations: int = 0
    control_calls: int = 0  # other control-plane calls (batch and file routes)

    def per_unit(self, value: float) -> float:
        return value / self.units

    def costs(self) -> dict[str, float]:
        """USD per unit of work, by what is paid for."""
        reads = sum(n for op, n in self.dynamodb.items() if op in READS)
        writes = sum(n for op, n in self.dynamodb.items() if op in WRITE_OPERATIONS)
        gb_seconds = (
            self.proxy_seconds * PROXY_GB
            + (self.callback_ms + self.submitter_ms) / 1000 * CONTROL_GB
        )
        invocations = self.proxy_invocations + self.callbacks + self.control_calls
        invocations += self.submitter_invocations
        return {
            "DynamoDB": self.per_unit(
                reads * PRICES["dynamodb_read"] + writes * PRICES["dynamodb_write"]
            ),
            "SQS": self.per_unit(sum(self.sqs.values()) * PRICES["sqs_request"]),
            "S3": self.per_unit(
                self.s3.get("PUT", 0) * PRICES["s3_put"]
                + (self.s3.get("GET", 0) + self.s3.get("HEAD", 0)) * PRICES["s3_get"]
            ),
            "API Gateway": self.per_unit(
                (self.proxy_invocations + self.callbacks + self.control_calls)
                * PRICES["api_gateway_request"]
            ),
            "Lambda": self.per_unit(
                gb_seconds * PRICES["lambda_gb_second"]
                + invocations * PRICES["lambda_invocation"]
            ),
        }


class Meter:
    """Reads what the stack's moto server, Compute stand-in and log saw between two points."""

    def __init__(self, state: dict[str, Any], log: Path) -> None:
        self.state = state
        self.log = log

    def _moto(self, action: str) -> bytes:
        url = f"{self.state['aws_endpoint_url']}/moto-api/recorder/{action}"
        method = "GET" if action.startswith("download") else "POST"
        with urllib.request.urlopen(urllib.request.Request(url, method=method)) as answer:
            return bytes(answer.read())

    def _compute_calls(self) -> int:
        with urllib.request.urlopen(f"{self.state['globus_compute_url']}/_standin/calls") as a:
            return int(json.load(a)["total"])

    def measure(self, units: int, work: Callable[[Tally], None], settle: float = 1.5) -> Tally:
        tally = Tally(units)
        self._moto("reset-recording")
        self._moto("start-recording")
        calls, offset = self._compute_calls(), self.log.stat().st_size
        work(tally)
        time.sleep(settle)  # usage records and late callbacks land
        self._moto("stop-recording")
        tally.compute_calls = self._compute_calls() - calls
        for entry in _entries(self._moto("download-recording").decode()):
            _count_aws(entry, tally)
        with self.log.open() as log:
            log.seek(offset)
            for line in log:
                _count_log(line, tally)
        return tally


def _entries(recording: str) -> Iterator[dict[str, Any]]:
    """The recorder's entries, one JSON object a line; moto's threads sometimes write two
    entries on one line (no newline between them), so each line is decoded object by object."""
    decoder = json.JSONDecoder()
    for line in recording.splitlines():
        position = 0
        while position < len(line):
            entry, end = decoder.raw_decode(line, position)
            yield entry
            position = end
            while position < len(line) and line[position].isspace():
                position += 1


def _count_aws(entry: dict[str, Any], tally: Tally) -> None:
    headers = {k.lower(): v for k, v in entry["headers"].items()}
    target = headers.get("x-amz-target", "")
    if target.startswith("DynamoDB_"):
        tally.dynamodb[target.rpartition(".")[2]] += 1
    elif target.startswith("AmazonSQS."):
        operation = target.rpartition(".")[2]
        # The event source long-polls whether or not anything waits: a cost per poller and
        # minute (a few cents a month), not per request; what it receives is one per batch.
        if operation != "ReceiveMessage":
            tally.sqs[operation] += 1
    elif "/moto-api/" not in entry["url"]:
        tally.s3[entry["method"]] += 1


def _count_log(line: str, tally: Tally) -> None:
    if line.startswith("submitter: {"):
        summary = json.loads(line.split(": ", 1)[1])
        tally.submitter_ms += summary.get("ms", 0)
        tally.submitter_invocations += 1
        tally.sqs["ReceiveMessage"] += 1  # the poll that brought this invocation its batch
        return
    if not line.startswith('{"_aws"'):
        return
    metric = json.loads(line)
    if "CallbackMs" in metric:
        values = metric["CallbackMs"]  # powertools writes a metric's values as a list
        values = values if isinstance(values, list) else [values]
        tally.callback_ms += sum(float(v) for v in values)
        tally.callbacks += 1


def chat(client: openai.OpenAI, tally: Tally, stream: bool, model: str = MODEL) -> None:
    started = time.perf_counter()
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model=model, messages=MESSAGES, max_tokens=32, stream=True
        ) as response:
            assert "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    else:
        assert client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=32
        ).choices[0].message.content
    tally.proxy_seconds += time.perf_counter() - started
    tally.proxy_invocations += 1


def batch_of(client: openai.OpenAI, lines: int, tally: Tally) -> None:
    body = "\n".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": MESSAGES, "max_tokens": 32},
            }
        )
        for i in range(lines)
    )
    file = client.files.create(file=("in.jsonl", body.encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    tally.control_calls += 2
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        tally.control_calls += 1
        time.sleep(0.5)
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None
    client.files.content(batch.output_file_id).read()
    tally.control_calls += 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--burst", type=int, default=40)
    parser.add_argument("--batch-lines", type=int, default=200)
    args = parser.parse_args()

    from first_local.globus_standin import mint_token
    from first_local.stack import stack_process

    work_dir = Path(tempfile.mkdtemp(prefix="first-cost-"))
    log = work_dir / "stack.log"
    options = ("--metrics", "--workers", "4", "--reconcile-every", "0", "--health-every", "0")
    env = {"MOTO_RECORDER_FILEPATH": str(work_dir / "moto-recording")}
    with stack_process(*options, "--compute-api-limit", "20/10", env=env, log=log) as state:
        client, other = (
            openai.OpenAI(
                base_url=f"{state['base_url']}/v1", api_key=mint_token(user), max_retries=0
            )
            for user in ("alice", "dave")
        )
        meter = Meter(state, log)
        for stream in (False, True):  # warm: connections, token caches, workers
            for who in (client, other):
                for model in BURST_MODELS:
                    chat(who, Tally(1), stream, model)
        time.sleep(2.5)

        def alone(stream: bool) -> Callable[[Tally], None]:
            def work(tally: Tally) -> None:
                for _ in range(args.requests):
                    chat(client, tally, stream)
                    time.sleep(1.1)  # low load: each submitted at once

            return work

        def burst(tally: Tally) -> None:
            def one(i: int) -> None:
                who = (client, other)[i // 2 % 2]
                chat(who, tally, i % 2 == 1, BURST_MODELS[i // 4 % 2])

            with ThreadPoolExecutor(args.burst) as pool:
                list(pool.map(one, range(args.burst)))

        tallies = {
            "non-streamed, alone": meter.measure(args.requests, alone(False)),
            "streamed, alone": meter.measure(args.requests, alone(True)),
            f"{args.burst} at once (half streamed, queued)": meter.measure(args.burst, burst),
            f"one line of a {args.batch_lines}-line batch": meter.measure(
                args.batch_lines, lambda t: batch_of(client, args.batch_lines, t)
            ),
        }
    print(f"machine: {machine()}")
    header = (
        "| kind | DynamoDB reads / writes | SQS | S3 | Globus Compute calls | Lambda GB-s "
        "| USD per million: DynamoDB | SQS | S3 | API Gateway | Lambda | total |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for kind, tally in tallies.items():
        reads = sum(n for op, n in tally.dynamodb.items() if op in READS)
        writes = sum(n for op, n in tally.dynamodb.items() if op in WRITE_OPERATIONS)
        gb = (
            tally.proxy_seconds * PROXY_GB
            + (tally.callback_ms + tally.submitter_ms) / 1000 * CONTROL_GB
        )
        costs = {name: usd * 1e6 for name, usd in tally.costs().items()}
        print(
            f"| {kind} | {tally.per_unit(reads):.2f} / {tally.per_unit(writes):.2f} "
            f"| {tally.per_unit(sum(tally.sqs.values())):.2f} "
            f"| {tally.per_unit(sum(tally.s3.values())):.3f} "
            f"| {tally.per_unit(tally.compute_calls):.3f} | {tally.per_unit(gb):.4f} | "
            + " | ".join(f"{v:.2f}" for v in costs.values())
            + f" | **{sum(costs.values()):.2f}** |"
        )
    for kind, tally in tallies.items():
        detail = ", ".join(f"{op} {n}" for op, n in sorted((tally.dynamodb + tally.sqs).items()))
        print(f"{kind}: {tally.units} units; {detail}; S3 {dict(tally.s3)}; "
              f"callbacks {tally.callbacks}, submitter runs {tally.submitter_invocations}")


if __name__ == "__main__":
    main()
