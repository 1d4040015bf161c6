"""The health poller, the qstat compute function, the status views, and the submit fallback."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

import first_core.compute
from compute_funcs.qstat import qstat
from first_core import inference
from first_core.compute import TaskState
from first_core.errors import NotFoundError, ServiceUnavailableError
from first_core.registry import CLUSTER_KEY, Registry, health, views
from first_core.tables import RegistryEntry, RequestRecord
from tests.support.compute import FakeBackend
from tests.support.identities import ALICE
from tests.support.registry import (
    POLARIS_ENDPOINT,
    REGISTERED_FUNCTIONS,
    SOPHIA_ENDPOINT,
    publish_local,
)

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
SMALL = "meta-llama/Llama-3.2-1B-Instruct"
EMBEDDING = "Salesforce/SFR-Embedding-Mistral"
SOPHIA = SOPHIA_ENDPOINT
POLARIS = POLARIS_ENDPOINT
QSTAT = REGISTERED_FUNCTIONS["qstat"]


@pytest.fixture
def registry_table(aws: None) -> None:
    publish_local()


def _rows() -> dict[tuple[str, str], RegistryEntry]:
    return {(r.cluster, r.key): r for r in RegistryEntry.scan(consistent_read=True)}


def _qstat_answer(states: dict[str, str], free: int | None = None) -> dict[str, Any]:
    return {"source": "pbs", "models": states, "free_nodes": free, "error": None}


# -- the poller -------------------------------------------------------------------------------
def test_poll_writes_endpoint_states_cluster_status_and_free_nodes(registry_table: None) -> None:
    backend = FakeBackend(
        endpoints={SOPHIA: "online", POLARIS: "offline"},
        qstat={SOPHIA: _qstat_answer({MODEL: "running", EMBEDDING: "queued"}, 3)},
    )

    report = health.poll(backend)

    rows = _rows()
    assert rows[("sophia", f"vllm#{MODEL}")].status == "running"
    assert rows[("sophia", "vllm#Salesforce/SFR-Embedding-Mistral")].status == "queued"
    # Not in qstat's answer: stopped.
    assert rows[("sophia", "vllm#meta-llama/Meta-Llama-3.1-70B-Instruct")].status == "stopped"
    assert rows[("sophia", CLUSTER_KEY)].status == "online"
    assert rows[("sophia", CLUSTER_KEY)].free_nodes == 3
    assert rows[("polaris", f"vllm#{MODEL}")].status == "offline"
    assert rows[("polaris", f"vllm#{SMALL}")].status == "offline"
    assert rows[("polaris", CLUSTER_KEY)].status == "offline"
    assert report.clusters == {"sophia": "online", "polaris": "offline"}
    # qstat only where the endpoint is online; once per endpoint, with the qstat function id.
    assert ("submit", SOPHIA, QSTAT) in backend.calls
    assert not [c for c in backend.calls if c[0] == "submit" and c[1] == POLARIS]
    snapshot = Registry.current()
    assert snapshot.clusters["sophia"].free_nodes == 3
    assert json.dumps(report.to_json())


def test_an_endpoint_without_workers_yet_makes_its_models_starting(registry_table: None) -> None:
    backend = FakeBackend(
        endpoints={SOPHIA: "online", POLARIS: "starting"}, qstat={SOPHIA: _qstat_answer({})}
    )

    report = health.poll(backend)

    rows = _rows()
    assert rows[("polaris", f"vllm#{MODEL}")].status == "starting"
    assert rows[("polaris", CLUSTER_KEY)].status == "online"
    assert report.clusters["polaris"] == "online"
    # No worker could run qstat there.
    assert not [c for c in backend.calls if c[0] == "submit" and c[1] == POLARIS]


def test_a_failed_or_silent_qstat_leaves_the_models_online(registry_table: None) -> None:
    backend = FakeBackend(
        qstat={
            SOPHIA: TaskState("failed", error="qstat: command not found"),
            POLARIS: TaskState("pending"),
        },
    )

    report = health.poll(backend, qstat_wait=0.2)

    rows = _rows()
    assert rows[("sophia", f"vllm#{MODEL}")].status == "online"
    assert rows[("polaris", f"vllm#{MODEL}")].status == "online"
    assert "failed" in (report.endpoints[SOPHIA].error or "")
    assert "did not answer" in (report.endpoints[POLARIS].error or "")


def test_maintenance_is_kept_by_the_poller_until_switched_off(registry_table: None) -> None:
    backend = FakeBackend(qstat={SOPHIA: _qstat_answer({MODEL: "running"})})

    health.set_maintenance("polaris", True)
    health.poll(backend)
    assert _rows()[("polaris", CLUSTER_KEY)].status == "maintenance"
    with pytest.raises(ServiceUnavailableError, match="maintenance"):
        from first_core.registry.routing import choose

        choose(Registry.current(), ALICE, SMALL)

    health.set_maintenance("polaris", False)
    health.poll(backend)
    assert _rows()[("polaris", CLUSTER_KEY)].status == "online"
    with pytest.raises(KeyError):
        health.set_maintenance("metis", True)


# -- the submit fallback ----------------------------------------------------------------------
@pytest.fixture
def fake_backend(registry_table: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackend]:
    backend = FakeBackend()
    monkeypatch.setattr(first_core.compute, "_backend", backend)
    yield backend


def _body(model: str = MODEL) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    ).encode()


def test_endpoint_offline_between_status_read_and_submit_goes_to_the_other(
    fake_backend: FakeBackend,
) -> None:
    """The registry says polaris runs the model (best), but its endpoint refuses the submit."""
    RegistryEntry("polaris", f"vllm#{MODEL}").update(actions=[RegistryEntry.status.set("running")])
    Registry.invalidate()
    fake_backend.refuse.add(POLARIS)

    submission = inference.submit(ALICE, "chat/completions", _body())

    assert submission.endpoint.cluster == "sophia"
    assert "after polaris refused the submit" in submission.route_reason
    submits = [c[1] for c in fake_backend.calls if c[0] == "submit"]
    assert submits == [POLARIS, SOPHIA]
    records = {r.request_id: r for r in RequestRecord.scan(consistent_read=True)}
    assert len(records) == 2
    assert records[submission.request_id].status == "submitted"
    [failed] = [r for r in records.values() if r.request_id != submission.request_id]
    assert failed.status == "failed"


def test_a_named_cluster_that_refuses_the_submit_is_503(fake_backend: FakeBackend) -> None:
    fake_backend.refuse.add(POLARIS)

    with pytest.raises(ServiceUnavailableError):
        inference.submit(ALICE, "chat/completions", _body(), cluster="polaris", framework="vllm")

    assert [c[1] for c in fake_backend.calls if c[0] == "submit"] == [POLARIS]


def test_every_endpoint_refusing_is_503_after_trying_each_once(fake_backend: FakeBackend) -> None:
    fake_backend.refuse |= {POLARIS, SOPHIA}

    with pytest.raises(ServiceUnavailableError, match="submit refused"):
        inference.submit(ALICE, "chat/completions", _body())

    assert sorted(c[1] for c in fake_backend.calls if c[0] == "submit") == [POLARIS, SOPHIA]


# -- the views --------------------------------------------------------------------------------
def test_list_endpoints_jobs_and_status(registry_table: None) -> None:
    backend = FakeBackend(
        endpoints={POLARIS: "offline"}, qstat={SOPHIA: _qstat_answer({MODEL: "running"}, free=2)}
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


# -- the qstat compute function ---------------------------------------------------------------
class _Models(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": MODEL}, {"id": "other"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_qstat_without_pbs_reports_the_models_vllm_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PATH", "/nonexistent")
        monkeypatch.setenv("VLLM_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
        answer = qstat([MODEL, SMALL])
    finally:
        server.shutdown()
    assert answer == {
        "source": "vllm",
        "models": {MODEL: "running", SMALL: "stopped"},
        "free_nodes": None,
        "error": None,
    }


def test_qstat_without_pbs_and_no_vllm_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("VLLM_BASE_URL", "http://127.0.0.1:9/v1")
    answer = qstat([MODEL])
    assert answer["models"] == {MODEL: "stopped"}
    assert answer["error"]


def test_qstat_reads_pbs_jobs_and_free_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = {
        "Jobs": {
            "1.pbs": {"Job_Name": f"vllm {MODEL}", "job_state": "R", "comment": "Job run"},
            "2.pbs": {"Job_Name": "vllm", "Variable_List": f"MODEL={SMALL}", "job_state": "Q"},
            "3.pbs": {
                "Job_Name": "vllm-70b",
                "job_state": "R",
                "Variable_List": "MODEL=meta-llama/Meta-Llama-3.1-70B-Instruct",
                "comment": "starting vLLM",
            },
        }
    }
    nodes = {"nodes": {"n1": {"state": "free"}, "n2": {"state": "busy"}, "n3": {"state": "free"}}}
    for name, data in (("qstat", jobs), ("pbsnodes", nodes)):
        script = tmp_path / name
        script.write_text(f"#!/bin/sh\ncat <<'JSON'\n{json.dumps(data)}\nJSON\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    answer = qstat([MODEL, SMALL, "meta-llama/Meta-Llama-3.1-70B-Instruct", "absent"])

    assert answer["source"] == "pbs"
    assert answer["models"] == {
        MODEL: "running",
        SMALL: "queued",
        "meta-llama/Meta-Llama-3.1-70B-Instruct": "starting",
        "absent": "stopped",
    }
    assert answer["free_nodes"] == 2
    assert answer["error"] is None


def test_operator_maintenance_command(
    registry_table: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from first_local.cli import main

    assert main(["registry", "maintenance", "sophia", "on"]) == 0
    assert _rows()[("sophia", CLUSTER_KEY)].status == "maintenance"
    assert _rows()[("sophia", CLUSTER_KEY)].config["maintenance"] is True
    assert main(["registry", "maintenance", "sophia", "off"]) == 0
    assert _rows()[("sophia", CLUSTER_KEY)].status == "online"
    assert main(["registry", "maintenance", "metis", "on"]) == 1
    assert "no cluster 'metis'" in capsys.readouterr().err
