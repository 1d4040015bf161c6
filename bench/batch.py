"""Batch throughput on the local stack: N prompts as one OpenAI batch vs. N single requests.

Starts the local stack (`first-gateway dev`), then, with the real `openai` package:

1. uploads an N-line batch file, creates the batch and polls until it ends; reports the upload
   time, time to `completed`, lines per second, the number of progress callbacks (as counts the
   batch showed) and the time to download the output file;
2. sends the same N prompts as single chat requests, C at a time (C = the batch function's
   concurrency, 8), and reports requests per second.

Both runs go to the same mock vLLM with the same per-request delay, in one process and one
run, so their ratio is what to read on this noisy machine.

    .venv/bin/python -m bench.batch [--lines 2000] [--delay-ms 0]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai

from bench.common import local_stack, machine

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
CONCURRENCY = 8  # compute_funcs/batch.py's default FIRST_BATCH_CONCURRENCY


def prompt(i: int, delay_ms: int) -> str:
    marker = f" [mock:delay={delay_ms}]" if delay_ms else ""
    return f"benchmark prompt {i}{marker}"


def run_batch(client: openai.OpenAI, lines: int, delay_ms: int) -> dict[str, Any]:
    body = "\n".join(
        json.dumps(
            {
                "custom_id": f"b-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": prompt(i, delay_ms)}],
                    "max_tokens": 16,
                },
            }
        )
        for i in range(lines)
    ).encode()
    started = time.perf_counter()
    file = client.files.create(file=("bench.jsonl", body), purpose="batch")
    uploaded = time.perf_counter()
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    seen_counts = set()
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
        if batch.request_counts is not None:
            seen_counts.add(batch.request_counts.completed)
    ended = time.perf_counter()
    assert batch.status == "completed" and batch.output_file_id, batch
    output = client.files.content(batch.output_file_id).text.splitlines()
    downloaded = time.perf_counter()
    assert len(output) == lines, (len(output), lines)
    return {
        "upload_s": uploaded - started,
        "create_to_completed_s": ended - uploaded,
        "lines_per_s": lines / (ended - uploaded),
        "distinct_progress_counts_seen": len(seen_counts),
        "output_bytes": sum(len(x) + 1 for x in output),
        "download_s": downloaded - ended,
    }


def run_singles(client: openai.OpenAI, requests: int, delay_ms: int) -> dict[str, Any]:
    def one(i: int) -> None:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt(i, delay_ms)}],
            max_tokens=16,
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - started
    return {"elapsed_s": elapsed, "requests_per_s": requests / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.batch")
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--delay-ms", type=int, default=0, help="mock vLLM delay per request")
    args = parser.parse_args()
    from first_local.globus_standin import mint_token

    print(machine())
    # The rate limit of the local registry (20 requests/s per user and model) would throttle
    # the singles; a user of its own per run keeps them apart, and the batch takes no slot of
    # it (batches do not count against per-request limits).
    with local_stack("--workers", "4", "--health-every", "0") as state:
        base = f"{state['base_url']}/v1"
        batch_client = openai.OpenAI(base_url=base, api_key=mint_token("alice"), max_retries=0)
        single_client = openai.OpenAI(base_url=base, api_key=mint_token("dave"), max_retries=5)
        batch = run_batch(batch_client, args.lines, args.delay_ms)
        singles = run_singles(single_client, args.lines, args.delay_ms)
    print(f"lines={args.lines} delay_ms={args.delay_ms} concurrency={CONCURRENCY}")
    print("batch:   " + json.dumps({k: round(v, 3) for k, v in batch.items()}))
    print("singles: " + json.dumps({k: round(v, 3) for k, v in singles.items()}))
    ratio = batch["lines_per_s"] / singles["requests_per_s"]
    print(f"batch lines/s ÷ single requests/s = {ratio:.2f}")


if __name__ == "__main__":
    main()
