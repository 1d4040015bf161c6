"""The status views (first_core.registry.views) over a polled registry: endpoints, jobs, status."""

from __future__ import annotations

from dataclasses import replace

import pytest

from first_core.errors import NotFoundError
from first_core.registry import Cluster, Endpoint, FunctionIds, Limits, Registry, health, views
from tests.support.compute import FakeBackend, qstat_answer
from tests.support.identities import ALICE, GROUP_A, GROUP_B
from tests.support.registry import (
    MODEL,
    POLARIS_ENDPOINT,
    SOPHIA_ENDPOINT,
)


# -- the views --------------------------------------------------------------------------------
def test_list_endpoints_jobs_and_status(registry_table: None) -> None:
    backend = FakeBackend(
        endpoints={POLARIS_ENDPOINT: "offline"},
        qstat={SOPHIA_ENDPOINT: qstat_answer({MODEL: "running"}, free=2)},
    )
    health.poll(backend)
    snapshot = Registry.current()

    listed = views.list_endpoints(snapshot, ALICE)
    assert set(listed["clusters"]) == {"sophia", "polaris", "direct"}
    sophia = listed["clusters"]["sophia"]
    assert sophia["base_url"] == "/resource_server/v1/sophia"
    assert MODEL in sophia["frameworks"]["vllm"]["models"]
    assert sophia["frameworks"]["vllm"]["endpoints"]["chat"] == "/vllm/v1/chat/completions"

    jobs = views.jobs(snapshot, ALICE, "sophia")
    assert [j["model"] for j in jobs["running"]] == [MODEL]
    assert {j["model"] for j in jobs["stopped"]} == {
        "meta-llama/Meta-Llama-3.1-70B-Instruct",
        "Salesforce/SFR-Embedding-Mistral",
    }
    assert jobs["queued"] == [] and jobs["free_nodes"] == 2
    assert {j["state"] for j in views.jobs(snapshot, ALICE, "polaris")["others"]} == {"offline"}
    with pytest.raises(NotFoundError):
        views.jobs(snapshot, ALICE, "metis")

    status = views.status(snapshot)["clusters"]
    assert status["sophia"]["status"] == "online"
    assert status["sophia"]["models"]["running"] == 1
    assert status["polaris"] == {
        "status": "offline",
        "free_nodes": None,
        "frameworks": ["vllm"],
        "models": {"running": 0, "starting": 0, "queued": 0, "stopped": 0, "offline": 2},
    }


# -- one model (GET /v1/models/{id}) ---------------------------------------------------------------
def _endpoint(cluster: str, model: str, groups: tuple[str, ...] = ()) -> Endpoint:
    return Endpoint(
        cluster=cluster,
        framework="vllm",
        model=model,
        endpoint_id=f"{cluster}-vllm",
        functions=FunctionIds(inference="local:inference"),
        limits=Limits(),
        allowed_groups=list(groups),
        allowed_domains=[],
        status="online",
    )


def test_one_model_is_its_list_entry_and_a_forbidden_one_is_not_found() -> None:
    restricted = "acme/Secret-Model"
    snapshot = Registry(
        {
            name: Cluster(
                name=name,
                frameworks=["vllm"],
                allowed_groups=[],
                allowed_domains=[],
                status="online",
            )
            for name in ("a", "b")
        },
        [_endpoint("a", MODEL), _endpoint("b", MODEL), _endpoint("a", restricted, (GROUP_B,))],
    )
    listed = views.models(snapshot, ALICE)["data"]
    assert views.model(snapshot, ALICE, MODEL) == next(m for m in listed if m["id"] == MODEL)
    assert views.model(snapshot, ALICE, MODEL)["clusters"] == ["a", "b"]
    assert views.model(snapshot, ALICE, MODEL, "b", "vllm")["clusters"] == ["b"]
    # A model the caller may not use answers exactly as one that does not exist.
    answers = []
    for who, model, cluster in (
        (ALICE, restricted, None),
        (ALICE, "acme/No-Such-Model", None),
        (ALICE, restricted, "b"),
    ):
        with pytest.raises(NotFoundError) as raised:
            views.model(snapshot, who, model, cluster, "vllm" if cluster else None)
        body = raised.value.to_body()["error"]
        assert (body["type"], body["param"], body["code"]) == (
            "invalid_request_error",
            "model",
            "model_not_found",
        )
        answers.append(body["message"].replace(model, "<id>"))
    assert len(set(answers)) == 1
    allowed = replace(ALICE, groups=frozenset({GROUP_A, GROUP_B}))
    assert views.model(snapshot, allowed, restricted)["id"] == restricted
