"""A request that names no `max_tokens` (the OpenAI SDK's default) cannot get around the
endpoint's cap or the caller's tokens per minute: the gateway sends vLLM an explicit max_tokens,
the smaller of the cap and what the caller's budget has left, and reserves exactly that.

Tried as an attacker would: 40 concurrent requests without max_tokens, each asking the mock for
6,000 tokens, against a model capped at 400 tokens with 3,000 tokens per minute per user; and
batches, which draw on the same minute as they run. A stack of its own, started with a registry
where the small model (and sophia, which runs the batches) have tight limits."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from first_local.globus_standin import mint_token
from first_local.stack import stack_process
from tests.contract.conftest import STACK_ENV, Stack
from tests.support.contract import MODEL, counter, line, rows, start, user_id, wait_for

SMALL = "meta-llama/Llama-3.2-1B-Instruct"  # the small model of infra/registry/local.yaml
LOCAL_REGISTRY = Path(__file__).resolve().parents[2] / "infra" / "registry" / "local.yaml"
CAP, TPM = 400, 3_000
BATCH_CAP, BATCH_TPM = 1_000, 2_000  # sophia, where batches run
LONG = [{"role": "user", "content": "Write at length [mock:tokens=6000]"}]


def tight_registry(path: Path) -> Path:
    registry = yaml.safe_load(LOCAL_REGISTRY.read_text())
    found = 0
    for cluster in registry["clusters"].values():
        for endpoint in cluster.get("endpoints", []):
            if SMALL in endpoint.get("models", []):
                endpoint["limits"] = {
                    "max_tokens": CAP,
                    "requests_per_second_per_user": 100,
                    "tokens_per_minute_per_user": TPM,
                }
                found += 1
            if endpoint.get("batches") and endpoint.get("backend") != "direct":
                endpoint["limits"] = {
                    "max_tokens": BATCH_CAP,
                    "requests_per_second_per_user": 100,
                    "tokens_per_minute_per_user": BATCH_TPM,
                }
                found += 1
    assert found == 2, "the local registry no longer serves the small model or batches"
    path.write_text(yaml.safe_dump(registry))
    return path


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    where = tmp_path_factory.mktemp("tight")
    with stack_process(
        "--registry",
        str(tight_registry(where / "registry.yaml")),
        "--compute-api-limit",
        "0",
        "--workers",
        "4",
        env=STACK_ENV,
        log=where / "stack.log",
    ) as state:
        yield Stack(state["base_url"], state)


def client(stack: Stack, user: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.base_url}/v1", api_key=mint_token(user), max_retries=0, timeout=60
    )


def test_forty_concurrent_requests_without_max_tokens_stay_within_cap_and_budget(
    tight: Stack,
) -> None:
    if time.time() % 60 > 45:  # the whole run inside one minute's window
        time.sleep(61 - time.time() % 60)
    minute = int(time.time() // 60)
    key = f"tpm#{user_id(tight, 'alice')}#{SMALL}#{minute}"
    sdk = client(tight, "alice")
    highest, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            highest[0] = max(highest[0], counter(tight, key))
            time.sleep(0.01)

    def ask(_: int) -> Any:
        try:
            return sdk.chat.completions.create(model=SMALL, messages=LONG)
        except openai.RateLimitError as refused:
            return refused

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=40) as pool:
            answers = list(pool.map(ask, range(40)))
    finally:
        done.set()
        watcher.join()
    assert int(time.time() // 60) == minute

    served = [a for a in answers if not isinstance(a, openai.RateLimitError)]
    refused = [a for a in answers if isinstance(a, openai.RateLimitError)]
    assert served and refused, "some requests must be served and the rest refused"
    for answer in served:
        assert answer.usage.completion_tokens <= CAP
        assert answer.choices[0].finish_reason == "length"  # cut at the max_tokens it was sent
    for error in refused:
        assert error.response.headers["retry-after"]
        assert error.response.json()["error"]["type"] == "rate_limit_error"
    used_tokens = sum(a.usage.total_tokens for a in served)
    assert used_tokens <= TPM
    # The counter never passed its limit, and holds exactly the use once all were settled (just
    # after each answered).
    assert highest[0] <= TPM
    deadline = time.monotonic() + 10
    while counter(tight, key) != used_tokens and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counter(tight, key) == used_tokens


def test_a_stream_without_max_tokens_is_cut_at_the_cap_too(tight: Stack) -> None:
    sdk = client(tight, "dave")
    stream = sdk.chat.completions.create(
        model=SMALL, messages=LONG, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == CAP
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [reason for reason in finished if reason] == ["length"]


def test_batches_draw_on_the_same_minute_and_wait_for_it(tight: Stack) -> None:
    if time.time() % 60 > 35:  # the whole test inside one minute's window
        time.sleep(61 - time.time() % 60)
    minute = int(time.time() // 60)
    key = f"tpm#{user_id(tight, 'alice')}#{MODEL}#{minute}"
    sdk = client(tight, "alice")
    on_sophia = openai.OpenAI(  # the model is on polaris too, with other limits
        base_url=f"{tight.base_url}/resource_server/v1/sophia/vllm/v1",
        api_key=mint_token("alice"),
        max_retries=0,
        timeout=60,
    )
    # Lines without max_tokens are sent the cap; what they use is taken from alice's minute.
    unnamed = json.loads(line("u1", "Write at length [mock:tokens=3000]"))
    del unnamed["body"]["max_tokens"]
    first = start(sdk, [line("n1", "hi [mock:tokens=20]", max_tokens=20), json.dumps(unnamed)])
    first = wait_for(sdk, first.id)
    assert first.status == "completed"
    answers = {r["custom_id"]: r["response"]["body"] for r in rows(sdk, first.output_file_id)}
    assert answers["u1"]["usage"]["completion_tokens"] == BATCH_CAP
    used = sum(body["usage"]["total_tokens"] for body in answers.values())
    extra = first.model_extra or {}
    assert extra["tokens_granted"] >= used
    assert counter(tight, key) == used  # the grants were settled to the real use

    # An interactive request takes most of what is left; a batch line that needs more waits.
    answer = on_sophia.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "[mock:tokens=5000] go"}]
    )
    assert answer.usage is not None
    before = used + answer.usage.total_tokens
    # Its reservation is settled to its use just after it answered.
    deadline = time.monotonic() + 10
    while counter(tight, key) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counter(tight, key) == before > BATCH_TPM - BATCH_CAP
    waiting = start(sdk, [json.dumps(unnamed)])
    waiting = wait_for(
        sdk, waiting.id, lambda b: (b.model_extra or {}).get("waiting_for_tokens_since")
    )
    assert waiting.status == "in_progress" and waiting.request_counts.completed == 0
    assert counter(tight, key) == before <= BATCH_TPM  # nothing taken while it waits
    sdk.batches.cancel(waiting.id)
    assert wait_for(sdk, waiting.id).status == "cancelled"
    assert int(time.time() // 60) == minute
