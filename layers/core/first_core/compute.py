"""Running functions on cluster endpoints: Globus Compute through its SDK, behind one interface.

`GlobusComputeBackend` is the only backend the gateway knows, in production and on the local
stack alike (there its web client is pointed at the stand-in of the Globus Compute service by
`GLOBUS_SDK_SERVICE_URL_COMPUTE`). It hands back task ids and looks tasks up by id later, with no
future held across calls, which is what stateless functions and the reconciler need.

How the real `globus_compute_sdk.Client` answers (facts: ../shared/notes/globus-compute-service.md):
a failed task makes `get_task` raise `TaskExecutionFailed` (never a dict with `exception`); a
finished task without a result carries only a `reason`; a task the service no longer knows is a
404. Ids must be canonical lowercase UUIDs (`run` looks its answer up by the caller's string).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from first_core.errors import ServiceUnavailableError

log = logging.getLogger("first.compute")

TaskStatus = Literal["pending", "success", "failed", "unknown"]
# "starting": the endpoint is up but has no workers yet (its batch job is still queued).
EndpointStatus = Literal["online", "starting", "offline"]

# globus-sdk's variable for a service's address, which the Compute Client itself ignores.
SERVICE_URL_VARIABLE = "GLOBUS_SDK_SERVICE_URL_COMPUTE"


@dataclass(frozen=True)
class TaskState:
    status: TaskStatus
    result: Any = None
    error: str | None = None


class ComputeBackend(Protocol):
    def submit(self, endpoint_id: str, function_id: str, kwargs: dict[str, Any]) -> str:
        """Start the function on the endpoint; return the task id."""
        ...

    def task_state(self, task_id: str) -> TaskState: ...

    def endpoint_status(self, endpoint_id: str) -> EndpointStatus:
        """Whether the endpoint takes work ("online"), is up without workers yet ("starting"),
        or does not ("offline")."""
        ...


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


class GlobusComputeBackend:
    """Globus Compute through its SDK: one Client per process (it sends one call at a time)."""

    def __init__(self, client: Any = None) -> None:
        self._client = client if client is not None else globus_client()

    def submit(self, endpoint_id: str, function_id: str, kwargs: dict[str, Any]) -> str:
        try:
            return str(self._client.run(endpoint_id=endpoint_id, function_id=function_id, **kwargs))
        except Exception as error:  # the SDK raises many types; all mean "not submitted"
            log.warning("Globus Compute refused a submit to %s: %r", endpoint_id, error)
            raise ServiceUnavailableError(
                f"Globus Compute did not accept the task: {type(error).__name__}",
                headers={"Retry-After": "5"},
            ) from error

    def task_state(self, task_id: str) -> TaskState:
        from globus_compute_sdk.errors import SerializationError, TaskExecutionFailed
        from globus_sdk import GlobusAPIError

        try:
            task = self._client.get_task(task_id)
        except TaskExecutionFailed as failed:
            log.warning("Globus Compute task %s failed:\n%s", task_id, failed.remote_data)
            return TaskState("failed", error=traceback_summary(failed.remote_data))
        except SerializationError as error:
            return TaskState("failed", error=f"its result could not be read ({error.reason})")
        except GlobusAPIError as error:
            if error.http_status in (404, 410):  # the service no longer knows the task
                return TaskState("unknown", error=f"Globus Compute: {error.http_status} {task_id}")
            raise
        finally:
            self._forget(task_id)
        if task.get("pending", True):
            return TaskState("pending")
        if "result" in task:
            return TaskState("success", result=task["result"])
        # Finished without a result or a traceback: the service says why, if anything.
        return TaskState("failed", error=str(task.get("reason") or "no result")[:2000])

    def endpoint_status(self, endpoint_id: str) -> EndpointStatus:
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
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and line.strip("+-") != ""
    ]
    return (lines[-1] if lines else "no traceback")[:limit]


_backend: ComputeBackend | None = None
_backend_lock = threading.Lock()


def set_backend(backend: ComputeBackend | None) -> None:
    """Install the backend this process uses (tests install a scripted one; None: the default)."""
    global _backend
    _backend = backend


def get_backend() -> ComputeBackend:
    global _backend
    with _backend_lock:
        if _backend is None:
            try:
                _backend = GlobusComputeBackend()
            except Exception as error:  # no token, service down: nothing can run now
                log.warning("Globus Compute is unreachable: %r", error)
                raise ServiceUnavailableError(
                    f"Globus Compute is unreachable: {type(error).__name__}",
                    headers={"Retry-After": "30"},
                ) from error
        return _backend
