"""Federation on the real local stack: one cluster's Globus Compute endpoint stopped, the health
poller sees it, federated requests go to the other cluster, and the status routes say so; and
what the real service does with a task for an endpoint that is down: it keeps it until the
endpoint returns."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from first_local.globus_standin import mint_token
from first_local.stack import stack_process
from tests.contract.conftest import STACK_ENV, Stack

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
SMALL = "meta-llama/Llama-3.2-1B-Instruct"


@pytest.fixture(scope="module")
def polaris_down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own whose polaris endpoint is offline from the start."""
    log = tmp_path_factory.mktemp("federation") / "stack.log"
    with stack_process(
        "--workers",
        "2",
        "--stop-endpoints",
        "polaris",
        "--health-every",
        "2",
        "--compute-api-limit",
        "0",
        env=STACK_ENV,
        log=log,
    ) as state:
        yield Stack(state["base_url"], state)


def _get(stack: Stack, path: str, user: str | None = "alice") -> Any:
    headers = {"Authorization": f"Bearer {mint_token(user)}"} if user else {}
    request = urllib.request.Request(stack.base_url + path, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _chat(client: openai.OpenAI, model: str = MODEL) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )


def test_federated_requests_for_a_model_on_both_go_to_the_live_cluster(polaris_down: Stack) -> None:
    client = polaris_down.client()
    for _ in range(3):
        raw = _chat(client)
        assert raw.headers["x-first-cluster"] == "sophia"
        assert raw.headers["x-first-route-reason"].startswith("sophia: model running")
        assert raw.parse().choices[0].message.content


def test_requests_naming_the_stopped_cluster_are_503_with_the_reason(polaris_down: Stack) -> None:
    client = polaris_down.client(federated=False, cluster="polaris")
    with pytest.raises(openai.InternalServerError) as refused:
        _chat(client)
    error = refused.value
    assert error.status_code == 503
    assert "polaris: offline" in error.message
    assert error.response.headers["retry-after"].isdigit()
    assert "polaris: offline" in error.response.headers["x-first-route-reason"]


def test_a_model_only_on_the_stopped_cluster_is_503_federated_too(polaris_down: Stack) -> None:
    with pytest.raises(openai.InternalServerError) as refused:
        _chat(polaris_down.client(), SMALL)
    assert refused.value.status_code == 503
    assert "polaris: offline" in refused.value.message


def test_status_needs_no_auth_and_shows_each_cluster(polaris_down: Stack) -> None:
    status = _get(polaris_down, "/resource_server/v1/status", user=None)["clusters"]
    assert set(status) == {"sophia", "polaris", "direct"}  # direct: a direct backend
    assert status["polaris"]["status"] == "offline"
    assert status["polaris"]["models"]["offline"] == 2
    assert status["sophia"]["status"] == "online"
    assert status["sophia"]["models"]["running"] == 3
    assert set(status["sophia"]) == {"status", "free_nodes", "frameworks", "models"}


def test_jobs_list_running_queued_and_stopped_models(polaris_down: Stack) -> None:
    jobs = _get(polaris_down, "/resource_server/v1/sophia/jobs")
    assert jobs["cluster"] == "sophia" and jobs["status"] == "online"
    assert {j["model"] for j in jobs["running"]} == {
        MODEL,
        "meta-llama/Meta-Llama-3.1-70B-Instruct",
        "Salesforce/SFR-Embedding-Mistral",
    }
    assert jobs["queued"] == [] and jobs["stopped"] == [] and jobs["starting"] == []
    assert {"model", "framework", "endpoint_id", "state"} <= set(jobs["running"][0])
    polaris = _get(polaris_down, "/resource_server/v1/polaris/jobs")
    assert polaris["status"] == "offline"
    assert {j["state"] for j in polaris["others"]} == {"offline"}


def test_list_endpoints_in_firsts_shape(polaris_down: Stack) -> None:
    listed = _get(polaris_down, "/resource_server/v1/list-endpoints")["clusters"]
    assert listed["polaris"]["base_url"] == "/resource_server/v1/polaris"
    vllm = listed["sophia"]["frameworks"]["vllm"]
    assert MODEL in vllm["models"]
    assert set(vllm["endpoints"]) == {"chat", "completion", "embedding"}


def test_models_carry_their_state_per_cluster(polaris_down: Stack) -> None:
    models = {m.id: m for m in polaris_down.client().models.list().data}
    assert models[MODEL].model_extra is not None
    assert models[MODEL].model_extra["states"] == {"sophia": "running", "polaris": "offline"}


def test_a_task_for_an_endpoint_that_went_down_waits_for_it(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """No health poller: the registry still says polaris is online, so a request naming it is
    submitted there. Globus Compute accepts the task for the offline endpoint and keeps it
    (waiting-for-ep); when the endpoint comes back, the task runs and the client, still
    waiting, gets its answer."""
    log = tmp_path_factory.mktemp("stale") / "stack.log"
    with stack_process(
        "--workers",
        "1",
        "--stop-endpoints",
        "polaris",
        "--health-every",
        "0",
        "--compute-api-limit",
        "0",
        "--result-wait",
        "30",
        env=STACK_ENV,
        log=log,
    ) as state:
        stale = Stack(state["base_url"], state)
        polaris = state["compute_endpoints"]["polaris"]
        assert stale.compute_standin("/_standin/endpoints")[polaris]["status"] == "offline"
        assert (
            _get(stale, "/resource_server/v1/status", user=None)["clusters"]["polaris"]["status"]
            == "online"
        )
        answers: list[Any] = []
        waiting = threading.Thread(
            target=lambda: answers.append(_chat(stale.client(federated=False, cluster="polaris")))
        )
        waiting.start()
        submits = "POST /v3/endpoints/{endpoint_id}/submit"
        deadline = time.monotonic() + 10
        while not stale.compute_standin("/_standin/calls")["routes"].get(submits):
            assert time.monotonic() < deadline, "the request was never submitted"
            time.sleep(0.1)
        time.sleep(1.0)
        assert waiting.is_alive()  # queued at Globus Compute, not refused
        assert stale.compute_standin("/_standin/endpoints")[polaris]["status"] == "offline"
        stale.compute_standin("/_standin/endpoints/polaris/start", method="POST")
        waiting.join(30)
        [raw] = answers
        assert raw.headers["x-first-cluster"] == "polaris"
        assert raw.parse().choices[0].message.content


def test_the_shared_stack_polls_too(stack: Stack) -> None:
    """The session's stack (all pools up): every model running after the first poll."""
    deadline = time.monotonic() + 30
    while True:
        status = _get(stack, "/resource_server/v1/status", user=None)["clusters"]
        if status["polaris"]["models"]["running"] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status["sophia"]["models"]["running"] == 3
    assert status["polaris"]["models"]["running"] == 2
    assert {c["status"] for c in status.values()} == {"online"}
