"""The health poller (first_core.registry.health): endpoint states, qstat answers, free nodes,
and maintenance."""

from __future__ import annotations

import json

import pytest

from first_core.compute import TaskState
from first_core.errors import ServiceUnavailableError
from first_core.registry import CLUSTER_KEY, Registry, health
from first_core.tables import RegistryEntry
from tests.support.compute import FakeBackend, qstat_answer
from tests.support.identities import ALICE
from tests.support.registry import (
    EMBEDDER,
    MODEL,
    POLARIS_ENDPOINT,
    REGISTERED_FUNCTIONS,
    SMALL_MODEL,
    SOPHIA_ENDPOINT,
)


def _rows() -> dict[tuple[str, str], RegistryEntry]:
    return {(r.cluster, r.key): r for r in RegistryEntry.scan(consistent_read=True)}


# -- the poller -------------------------------------------------------------------------------
def test_poll_writes_endpoint_states_cluster_status_and_free_nodes(registry_table: None) -> None:
    backend = FakeBackend(
        endpoints={SOPHIA_ENDPOINT: "online", POLARIS_ENDPOINT: "offline"},
        qstat={SOPHIA_ENDPOINT: qstat_answer({MODEL: "running", EMBEDDER: "queued"}, 3)},
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
    assert rows[("polaris", f"vllm#{SMALL_MODEL}")].status == "offline"
    assert rows[("polaris", CLUSTER_KEY)].status == "offline"
    # (The local direct backend is probed over HTTP: test_direct_backend_is_probed.)
    assert {k: v for k, v in report.clusters.items() if k != "direct"} == {
        "sophia": "online",
        "polaris": "offline",
    }
    # qstat only where the endpoint is online; once per endpoint, with the qstat function id.
    assert ("submit", SOPHIA_ENDPOINT, REGISTERED_FUNCTIONS["qstat"]) in backend.calls
    assert not [c for c in backend.calls if c[0] == "submit" and c[1] == POLARIS_ENDPOINT]
    snapshot = Registry.current()
    assert snapshot.clusters["sophia"].free_nodes == 3
    assert json.dumps(report.to_json())


def test_an_endpoint_without_workers_yet_makes_its_models_starting(registry_table: None) -> None:
    backend = FakeBackend(
        endpoints={SOPHIA_ENDPOINT: "online", POLARIS_ENDPOINT: "starting"},
        qstat={SOPHIA_ENDPOINT: qstat_answer({})},
    )

    report = health.poll(backend)

    rows = _rows()
    assert rows[("polaris", f"vllm#{MODEL}")].status == "starting"
    assert rows[("polaris", CLUSTER_KEY)].status == "online"
    assert report.clusters["polaris"] == "online"
    # No worker could run qstat there.
    assert not [c for c in backend.calls if c[0] == "submit" and c[1] == POLARIS_ENDPOINT]


def test_a_failed_or_silent_qstat_leaves_the_models_online(registry_table: None) -> None:
    backend = FakeBackend(
        qstat={
            SOPHIA_ENDPOINT: TaskState("failed", error="qstat: command not found"),
            POLARIS_ENDPOINT: TaskState("pending"),
        },
    )

    report = health.poll(backend, qstat_wait=0.2)

    rows = _rows()
    assert rows[("sophia", f"vllm#{MODEL}")].status == "online"
    assert rows[("polaris", f"vllm#{MODEL}")].status == "online"
    assert "failed" in (report.endpoints[SOPHIA_ENDPOINT].error or "")
    assert "did not answer" in (report.endpoints[POLARIS_ENDPOINT].error or "")


class _SwitchDuringPoll(FakeBackend):
    """An operator flips polaris's maintenance while the poll asks Globus Compute: after the
    poll read the registry, before it writes the statuses."""

    def __init__(self, on: bool) -> None:
        super().__init__(qstat={SOPHIA_ENDPOINT: qstat_answer({MODEL: "running"})})
        self.on, self.switched = on, False

    def endpoint_status(self, endpoint_id: str) -> object:
        if not self.switched:
            self.switched = True
            health.set_maintenance("polaris", self.on)
        return super().endpoint_status(endpoint_id)


@pytest.mark.parametrize("on", [True, False])
def test_a_maintenance_switch_during_a_poll_is_not_overwritten(
    registry_table: None, on: bool
) -> None:
    health.set_maintenance("polaris", not on)
    backend = _SwitchDuringPoll(on)

    health.poll(backend)

    assert backend.switched
    row = _rows()[("polaris", CLUSTER_KEY)]
    assert row.status == ("maintenance" if on else "online")
    assert row.config["maintenance"] is on
    health.poll(backend)  # the next poll starts from the switch and keeps it
    assert _rows()[("polaris", CLUSTER_KEY)].status == ("maintenance" if on else "online")


def test_maintenance_is_kept_by_the_poller_until_switched_off(registry_table: None) -> None:
    backend = FakeBackend(qstat={SOPHIA_ENDPOINT: qstat_answer({MODEL: "running"})})

    health.set_maintenance("polaris", True)
    health.poll(backend)
    assert _rows()[("polaris", CLUSTER_KEY)].status == "maintenance"
    with pytest.raises(ServiceUnavailableError, match="maintenance"):
        from first_core.registry.routing import choose

        choose(Registry.current(), ALICE, SMALL_MODEL)

    health.set_maintenance("polaris", False)
    health.poll(backend)
    assert _rows()[("polaris", CLUSTER_KEY)].status == "online"
    with pytest.raises(KeyError):
        health.set_maintenance("metis", True)
