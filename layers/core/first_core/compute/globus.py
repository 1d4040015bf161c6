"""`GlobusComputeBackend`: Globus Compute through the real `globus-compute-sdk` `Client`.

It is the only backend the gateway knows, in production and on the local stack alike (there its
web client is pointed at the stand-in of the Globus Compute service by
`GLOBUS_SDK_SERVICE_URL_COMPUTE`). Every call first takes a unit of the gateway's Globus Compute
API budget (`first_core.compute.budget`), at the priority its caller set; a request submitted at
once that finds none raises `BudgetExhausted` and goes to the submit queue instead.

How the real `globus_compute_sdk.Client` answers (facts: ../shared/notes/globus-compute-service.md):
a failed task makes `get_task` raise `TaskExecutionFailed` (never a dict with `exception`); a
finished task without a result carries only a `reason`; a task the service no longer knows is a
404. Ids must be canonical lowercase UUIDs (`run` looks its answer up by the caller's string).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial
from typing import Any

from first_core.compute import budget
from first_core.compute.base import EndpointStatus, TaskState
from first_core.errors import ServiceUnavailableError

log = logging.getLogger("first.compute")

# globus-sdk's variable for a service's address, which the Compute Client itself ignores.
SERVICE_URL_VARIABLE = "GLOBUS_SDK_SERVICE_URL_COMPUTE"


def globus_client(**options: Any) -> Any:
    """A `globus_compute_sdk.Client` (credentials from `GLOBUS_COMPUTE_CLIENT_ID/SECRET`).

    The Client chooses its address from `GLOBUS_SDK_ENVIRONMENT` alone; where
    `GLOBUS_SDK_SERVICE_URL_COMPUTE` names another, its web client is rebuilt for it (`base_url`
    must be a keyword), as upstream's own integration tests do, and the version check runs there.
    """
    from globus_compute_sdk import Client

    url = os.environ.get(SERVICE_URL_VARIABLE)
    if not url:
        return Client(**options)
    from globus_compute_sdk.sdk.client import _ComputeWebClient

    client = Client(do_version_check=False, **options)
    client._compute_web_client = _ComputeWebClient(base_url=url, app=client.app)
    client.web_service_address = url
    client.version_check()
    return client


class SubmitRefused(ServiceUnavailableError):
    """Globus Compute answered a submission with an error: no task was created."""


# Task ids per `batch_status` call.
_STATUS_CHUNK = 100


class GlobusComputeBackend:
    """Globus Compute through its SDK: one Client per process (it sends one call at a time)."""

    def __init__(self, client: Any = None) -> None:
        if client is None:
            with budget.priority(budget.Priority.BACKGROUND):
                budget.spend()  # the Client's version check
            client = globus_client()
        self._client = client

    def submit(self, endpoint_id: str, function_id: str, kwargs: dict[str, Any]) -> str:
        budget.spend()
        try:
            return str(self._client.run(endpoint_id=endpoint_id, function_id=function_id, **kwargs))
        except Exception as error:  # the SDK raises many types; all mean "not submitted"
            log.warning("Globus Compute refused a submit to %s: %r", endpoint_id, error)
            raise ServiceUnavailableError(
                "Globus Compute did not accept the task; retry shortly.",
                headers={"Retry-After": "5"},
            ) from error

    def submit_batch(
        self, endpoint_id: str, tasks: list[tuple[str, dict[str, Any]]], task_group_id: str
    ) -> list[str]:
        """Send many tasks to one endpoint in one call, as one task group; their task ids, in
        order. `SubmitRefused` if the service said no (nothing was created); any other error
        leaves it unknown whether the tasks exist (`task_group` tells)."""
        from globus_sdk import GlobusAPIError

        budget.spend()
        batch = self._client.create_batch(task_group_id=task_group_id)
        for function_id, kwargs in tasks:
            batch.add(function_id, args=(), kwargs=kwargs)
        try:
            answer = self._client.batch_run(endpoint_id, batch)
        except GlobusAPIError as error:
            if 400 <= error.http_status < 500:
                raise SubmitRefused(
                    f"Globus Compute refused the batch: HTTP {error.http_status} {error.code}"
                ) from error
            raise
        given = {str(f): list(ids) for f, ids in answer["tasks"].items()}
        return [given[function_id].pop(0) for function_id, _ in tasks]

    def task_group(self, task_group_id: str) -> list[str] | None:
        """The ids of a task group's tasks, or None if Globus Compute has no such group (the
        batch that would have made it was never received)."""
        from globus_sdk import GlobusAPIError

        budget.spend()
        try:
            group = self._client._compute_web_client.v2.get_task_group(task_group_id)
        except GlobusAPIError as error:
            if error.http_status == 404:
                return None
            raise
        return [str(task["id"]) for task in group.get("tasks") or []]

    def task_states(self, task_ids: list[str]) -> dict[str, TaskState]:
        """Each task's state, a hundred per `batch_status` call, each document read as
        `get_task` reads it."""
        states: dict[str, TaskState] = {}
        for start in range(0, len(task_ids), _STATUS_CHUNK):
            chunk = task_ids[start : start + _STATUS_CHUNK]
            budget.spend()
            documents = self._client._compute_web_client.v2.get_task_batch(chunk)["results"]
            for task_id in chunk:
                document = documents.get(task_id)
                if not isinstance(document, dict):
                    states[task_id] = TaskState("unknown", error="Globus Compute lost the task")
                    continue
                # The SDK's own reading of a task document (what `get_task` does with one).
                states[task_id] = self._state(task_id, partial(self._read, document, task_id))
        return states

    def task_state(self, task_id: str) -> TaskState:
        from globus_sdk import GlobusAPIError

        budget.spend()
        try:
            return self._state(task_id, lambda: self._client.get_task(task_id))
        except GlobusAPIError as error:
            if error.http_status in (404, 410):  # the service no longer knows the task
                return TaskState("unknown", error=f"Globus Compute: {error.http_status} {task_id}")
            raise

    def _read(self, document: dict[str, Any], task_id: str) -> dict[str, Any]:
        return dict(self._client._update_task_table(document, task_id))

    def _state(self, task_id: str, read: Callable[[], dict[str, Any]]) -> TaskState:
        from globus_compute_sdk.errors import SerializationError, TaskExecutionFailed

        try:
            task = read()
        except TaskExecutionFailed as failed:
            log.warning("Globus Compute task %s failed:\n%s", task_id, failed.remote_data)
            return TaskState("failed", error=traceback_summary(failed.remote_data))
        except SerializationError as error:
            return TaskState("failed", error=f"its result could not be read ({error.reason})")
        finally:
            self._forget(task_id)
        if task.get("pending", True):
            return TaskState("pending")
        if "result" in task:
            return TaskState("success", result=task["result"])
        # Finished without a result or a traceback: the service says why, if anything.
        return TaskState("failed", error=str(task.get("reason") or "no result")[:2000])

    def endpoint_status(self, endpoint_id: str) -> EndpointStatus:
        budget.spend()
        try:
            answer = self._client.get_endpoint_status(endpoint_id)
        except Exception:  # unknown endpoint, Globus outage: not usable now
            return "offline"
        if str(answer.get("status", "")).lower() != "online":
            return "offline"
        # An endpoint reports its workers; none yet means its nodes have not started.
        workers = (answer.get("details") or {}).get("total_workers")
        return "starting" if workers == 0 else "online"

    def _forget(self, task_id: str) -> None:
        # The Client keeps every task it has looked up, forever; a Lambda or the local stack
        # lives long and looks each task up until it ends, then never again.
        table = getattr(self._client, "_task_status_table", None)
        if isinstance(table, dict):
            table.pop(str(task_id), None)


def traceback_summary(text: str, limit: int = 500) -> str:
    """The exception line of a remote traceback (its last line that says something)."""
    lines = [line.strip() for line in text.splitlines() if line.strip().strip("+-")]
    return (lines[-1] if lines else "no traceback")[:limit]
