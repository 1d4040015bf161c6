"""Globus Compute on the local stack, as the real SDK and the gateway meet it: the stand-in of
the web service, its endpoints' real engines, and the service's own rules (its API limit, and
endpoints that are up before their workers are)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from globus_compute_sdk import Client
from globus_compute_sdk.sdk.client import _ComputeWebClient
from globus_compute_sdk.serialize import DillCodeSource

from first_local.stack import stack_process
from tests.contract.conftest import STACK_ENV, Stack

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
SUBMIT = "POST /v3/endpoints/{endpoint_id}/submit"


def where_am_i(greeting: str) -> dict[str, str]:
    import os

    return {"greeting": greeting, "vllm": os.environ.get("VLLM_BASE_URL", "")}


def chat(stack: Stack) -> Any:
    return stack.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )


def test_the_state_file_names_the_service_its_client_and_endpoints(stack: Stack) -> None:
    state = stack.state
    assert state["globus_compute_url"].startswith("http://127.0.0.1:")
    assert state["compute_client_id"] and state["compute_client_secret"]
    assert set(state["compute_endpoints"]) == {"sophia", "polaris"}
    endpoints = stack.compute_standin("/_standin/endpoints")
    for cluster, endpoint_id in state["compute_endpoints"].items():
        assert isinstance(endpoint_id, str)
        assert endpoints[endpoint_id]["name"] == cluster
        assert endpoints[endpoint_id]["status"] == "online"


def test_the_real_sdk_runs_a_function_of_its_own_on_each_endpoint(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What an outside user does with the state file: the credentials, Globus Auth's address,
    and the Client's web client pointed at the stand-in (upstream's own test recipe)."""
    state = stack.state
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_ID", state["compute_client_id"])
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_SECRET", state["compute_client_secret"])
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", state["globus_auth_url"])
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(tmp_path))
    client = Client(do_version_check=False, code_serialization_strategy=DillCodeSource())
    client._compute_web_client = _ComputeWebClient(
        base_url=state["globus_compute_url"], app=client.app
    )
    client.version_check()
    function_id = client.register_function(where_am_i)

    for endpoint_id in state["compute_endpoints"].values():
        task_id = client.run("hello", endpoint_id=endpoint_id, function_id=function_id)
        deadline = time.monotonic() + 30
        while (task := client.get_task(task_id))["pending"]:
            assert time.monotonic() < deadline, task
            time.sleep(0.1)
        # It ran on a cluster's worker: it sees the endpoint's environment.
        assert task["result"] == {"greeting": "hello", "vllm": state["backend_url"]}


def test_the_gateways_calls_are_counted_by_route_and_client(stack: Stack) -> None:
    before = stack.compute_standin("/_standin/calls")

    assert chat(stack).parse().choices[0].message.content

    after = stack.compute_standin("/_standin/calls")
    assert after["routes"][SUBMIT] >= before["routes"].get(SUBMIT, 0) + 1
    client = stack.state["compute_client_id"]
    assert after["clients"][client] > before["clients"].get(client, 0)
    assert isinstance(after["throttled"], int) and after["limit"] == "0"


# ---------------------------------------------------------------- --compute-api-limit 20/10


@pytest.fixture(scope="module")
def at_the_limit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The service's own limit, and every batch the submitter sends dies before it writes a
    task id (`--kill-submitter 1`): only the claims and the reconciler stand between that and
    lost or doubled requests."""
    log = tmp_path_factory.mktemp("limit") / "stack.log"
    with stack_process(
        "--workers",
        "2",
        "--compute-api-limit",
        "20/10",
        "--kill-submitter",
        "1",
        "--health-every",
        "0",
        "--reconcile-every",
        "1",
        "--reconcile-grace",
        "1",
        "--result-wait",
        "60",
        env=STACK_ENV,
        log=log,
    ) as state:
        yield Stack(state["base_url"], {**state, "log": str(log)})


def test_past_the_budget_requests_queue_and_all_complete_once(at_the_limit: Stack) -> None:
    """40 requests at once, half streamed: far more than 20 calls in 10 s would allow one by
    one. The budget submits a few at once and queues the rest; the submitter sends them in
    batches (and dies after each); every request completes exactly once, the service never
    answered 429, and it ran exactly one task per request."""
    stack = at_the_limit
    before = stack.compute_standin("/_standin/calls")
    client = stack.client()

    def one(index: int) -> str:
        messages: Any = [{"role": "user", "content": f"question {index}"}]
        if index % 2:
            with client.chat.completions.with_streaming_response.create(
                model=MODEL, messages=messages, max_tokens=6, stream=True
            ) as response:
                text = "".join(
                    c.choices[0].delta.content or "" for c in response.parse() if c.choices
                )
                assert text
                return str(response.headers["x-first-request-id"])
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=6
        )
        assert raw.parse().choices[0].message.content
        return str(raw.headers["x-first-request-id"])

    with ThreadPoolExecutor(20) as pool:
        request_ids = list(pool.map(one, range(40)))

    after = stack.compute_standin("/_standin/calls")
    assert after["throttled"] == before["throttled"] == 0
    assert after["tasks"] - before["tasks"] == 40  # one task per request: none sent twice
    assert after["routes"][SUBMIT] - before["routes"].get(SUBMIT, 0) < 40  # batched
    for request_id in request_ids:
        item = stack.item("requests", request_id)
        assert item is not None and item["status"] == "completed", item
    # The submitter did die: requests were queued, and every batch it sent was cut short.
    assert "submitter: killed" in Path(stack.state["log"]).read_text()


# ---------------------------------------------------------------- --endpoint-start-delay S


@pytest.fixture(scope="module")
def starting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack_process(
        "--workers",
        "1",
        "--endpoint-start-delay",
        "8",
        "--health-every",
        "1",
        "--compute-api-limit",
        "0",
        env=STACK_ENV,
        log=tmp_path_factory.mktemp("starting") / "stack.log",
    ) as state:
        yield Stack(state["base_url"], state)


def test_models_on_endpoints_without_workers_yet_are_starting_then_served(
    starting: Stack,
) -> None:
    sophia = starting.state["compute_endpoints"]["sophia"]
    details = starting.compute_standin("/_standin/endpoints")[sophia]["details"]
    assert details["total_workers"] == 0

    with pytest.raises(openai.InternalServerError) as refused:
        chat(starting)
    assert refused.value.status_code == 503
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["code"] == "model_starting"
    assert refused.value.response.headers["retry-after"].isdigit()
    models = {m.id: m.model_extra or {} for m in starting.client().models.list().data}
    assert models[MODEL]["states"] == {"sophia": "starting", "polaris": "starting"}

    deadline = time.monotonic() + 30
    while True:
        try:
            reply = chat(starting)
            break
        except openai.InternalServerError as error:
            assert error.status_code == 503 and time.monotonic() < deadline, error
            time.sleep(0.5)
    assert reply.parse().choices[0].message.content
    assert starting.compute_standin("/_standin/endpoints")[sophia]["details"]["total_workers"] == 1
