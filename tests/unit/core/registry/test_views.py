"""The status views (first_core.registry.views) over a polled registry: endpoints, jobs, status."""

from __future__ import annotations

import pytest

from first_core.errors import NotFoundError
from first_core.registry import Registry, health, views
from tests.support.compute import FakeBackend, qstat_answer
from tests.support.identities import ALICE
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
    assert set(listed["clusters"]) == {"sophia", "polaris"}
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
