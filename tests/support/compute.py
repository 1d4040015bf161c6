"""One scriptable compute backend for the core's tests, and the stand-ins' handle for the tests
that run the real Globus Compute SDK (`tests/unit/conftest.py: globus_compute`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from first_core.compute import TaskState
from first_core.errors import ServiceUnavailableError
from first_local.compute_standin import ComputeService
from first_local.compute_standin.endpoints import LocalEndpoint

# The Compute stand-in's endpoint in the unit tests.
TEST_ENDPOINT_ID = "6a1b2c3d-0000-4000-8000-00000000e001"


class FakeBackend:
    """A `ComputeBackend` whose answers the test writes: each endpoint's status (`endpoints`,
    online by default), each task's state (`states`, by task id: `task-1`, `task-2`... in the
    order of the submits; unknown by default), and qstat's answer per endpoint (`qstat`: a
    result, or a TaskState), given to any task submitted with qstat's `models` argument.
    `refuse` (endpoint ids) and `fail_with` make submits fail. Every call is recorded."""

    def __init__(
        self,
        states: dict[str, TaskState] | None = None,
        *,
        endpoints: dict[str, str] | None = None,
        qstat: dict[str, Any] | None = None,
    ) -> None:
        self.states = dict(states or {})
        self.endpoints = dict(endpoints or {})
        self.qstat = dict(qstat or {})
        self.refuse: set[str] = set()
        self.fail_with: Exception | None = None
        self.calls: list[tuple[str, ...]] = []
        self.submits: list[tuple[str, str, dict[str, Any]]] = []
        self.asked: list[str] = []

    def endpoint_status(self, endpoint_id: str) -> Any:
        self.calls.append(("endpoint_status", endpoint_id))
        return self.endpoints.get(endpoint_id, "online")

    def submit(self, endpoint_id: str, function_id: str, kwargs: dict[str, Any]) -> str:
        self.calls.append(("submit", endpoint_id, function_id))
        if self.fail_with is not None:
            raise self.fail_with
        if endpoint_id in self.refuse:
            raise ServiceUnavailableError(f"Compute endpoint {endpoint_id} is offline.")
        self.submits.append((endpoint_id, function_id, kwargs))
        task_id = f"task-{len(self.submits)}"
        if "models" in kwargs and endpoint_id in self.qstat:
            answer = self.qstat[endpoint_id]
            state = answer if isinstance(answer, TaskState) else TaskState("success", answer)
            self.states[task_id] = state
        return task_id

    def task_state(self, task_id: str) -> TaskState:
        self.asked.append(task_id)
        return self.states.get(task_id, TaskState("unknown", error="no such task"))

    def task_states(self, task_ids: list[str]) -> dict[str, TaskState]:
        return {task_id: self.task_state(task_id) for task_id in task_ids}


def qstat_answer(states: dict[str, str], free: int | None = None) -> dict[str, Any]:
    """What the qstat compute function answers where PBS runs: each model's state, free nodes."""
    return {"source": "pbs", "models": states, "free_nodes": free, "error": None}


@dataclass
class ComputeStandIn:
    """The Auth and Compute stand-ins serving in the test process, and the Compute service's
    state (so a test can stop its endpoint, switch its faults or set its limit)."""

    service: ComputeService
    endpoint: LocalEndpoint
    auth_url: str
    compute_url: str
