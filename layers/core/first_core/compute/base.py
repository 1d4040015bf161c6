"""What the gateway asks of the clusters' compute service, whichever it is: start a function,
look tasks up by id later, tell whether an endpoint takes work. No future is held across calls,
which is what stateless functions and the reconciler need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

TaskStatus = Literal["pending", "success", "failed", "unknown"]
# "starting": the endpoint is up but has no workers yet (its batch job is still queued).
EndpointStatus = Literal["online", "starting", "offline"]

@dataclass(frozen=True)
class TaskState:
    """A task's state as Globus Compute reports it: its status, and its result or error once it
    ended."""

    status: TaskStatus
    result: Any = None
    error: str | None = None


class ComputeBackend(Protocol):
    """What the gateway needs from Globus Compute: submit a function to an endpoint, read tasks'
    states, an endpoint's status. `GlobusComputeBackend` is the one implementation; tests script
    their own."""

    def submit(self, endpoint_id: str, function_id: str, kwargs: dict[str, Any]) -> str:
        """Start the function on the endpoint; return the task id."""
        ...

    def task_state(self, task_id: str) -> TaskState: ...

    def task_states(self, task_ids: list[str]) -> dict[str, TaskState]:
        """Many tasks' states at once (a hundred per call)."""
        ...

    def submit_batch(
        self, endpoint_id: str, tasks: list[tuple[str, dict[str, Any]]], task_group_id: str
    ) -> list[str]:
        """Many tasks to one endpoint in one call (one task group); their ids, in order."""
        ...

    def task_group(self, task_group_id: str) -> list[str] | None:
        """The task ids of a task group, or None if there is no such group."""
        ...

    def endpoint_status(self, endpoint_id: str) -> EndpointStatus:
        """Whether the endpoint takes work ("online"), is up without workers yet ("starting"),
        or does not ("offline")."""
        ...
