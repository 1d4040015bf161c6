"""Running functions on cluster endpoints, behind one interface.

`GlobusComputeBackend` submits to registered functions through `globus-compute-sdk`.
`LocalComputeBackend` runs the same `compute_funcs` in a local pool of worker processes, one pool
per endpoint id, after a round trip through Globus Compute's own serializer, so what would not
serialize for a cluster fails here too. Both hand back task ids and look tasks up by id later,
with no future held across calls, which is what stateless functions and the reconciler need.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import urllib.parse
import uuid
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from first_core.errors import ServiceUnavailableError

TaskStatus = Literal["pending", "success", "failed", "unknown"]
# "starting": the endpoint is up but has no workers yet (its batch job is still queued).
EndpointStatus = Literal["online", "starting", "offline"]


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


class GlobusComputeBackend:
    """Globus Compute through its SDK; credentials come from `GLOBUS_COMPUTE_CLIENT_ID/SECRET`."""

    def __init__(self) -> None:
        from globus_compute_sdk import Client

        self._client = Client()

    def submit(self, endpoint_id: str, function_id: str, kwargs: dict[str, Any]) -> str:
        try:
            return str(self._client.run(endpoint_id=endpoint_id, function_id=function_id, **kwargs))
        except Exception as error:  # the SDK raises many types; all mean "not submitted"
            raise ServiceUnavailableError(
                f"Globus Compute did not accept the task: {type(error).__name__}",
                headers={"Retry-After": "5"},
            ) from error

    def task_state(self, task_id: str) -> TaskState:
        from globus_sdk import GlobusAPIError

        try:
            task = self._client.get_task(task_id)
        except GlobusAPIError as error:
            if error.http_status in (404, 410):  # the service no longer knows the task
                return TaskState("unknown", error=f"Globus Compute: {error.http_status} {task_id}")
            raise
        if task.get("pending"):
            return TaskState("pending")
        if "exception" in task:
            return TaskState("failed", error=str(task["exception"])[:2000])
        return TaskState("success", result=task.get("result"))

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


_worker_functions: dict[str, Any] = {}


def code_serializer() -> Any:
    """Functions travel as source code, as they must to a cluster where this project is not
    installed (Globus Compute's default pickles a module function by reference)."""
    from globus_compute_sdk.serialize import ComputeSerializer, DillCodeSource

    return ComputeSerializer(strategy_code=DillCodeSource())


def _run_serialized(function_buffer: str, kwargs_buffer: str) -> Any:
    """Runs in a worker process: what a Globus Compute worker does with a task."""
    from globus_compute_sdk.serialize import ComputeSerializer

    serializer = ComputeSerializer()
    # A worker keeps functions it has seen, as a Globus Compute worker does.
    function = _worker_functions.get(function_buffer)
    if function is None:
        function = _worker_functions[function_buffer] = serializer.deserialize(function_buffer)
    kwargs = serializer.deserialize(kwargs_buffer)
    # Fault injection of the local stack (`first-gateway dev --fail-compute F`).
    fail = float(os.environ.get("FIRST_LOCAL_FAIL_COMPUTE") or 0)
    if fail and random.random() < fail:
        raise RuntimeError("injected fault: the compute function raised (--fail-compute)")
    return function(**kwargs)


def _set_environment(env: dict[str, str]) -> None:
    os.environ.update(env)


def _warm_up() -> int:
    import globus_compute_sdk.serialize  # noqa: F401  (import cost paid before the first task)

    return os.getpid()


class LocalComputeBackend:
    """A pool of worker processes per endpoint id, running `compute_funcs` for real."""

    def __init__(
        self,
        worker_env: dict[str, str],
        workers_per_endpoint: int = 4,
        callback_base_url: str | None = None,
    ) -> None:
        # Callbacks go here instead of the gateway's own URL (the local fault proxy).
        self._callback_base_url = callback_base_url
        # Task ids name this pool, so a pool never claims another gateway process's tasks.
        self._prefix = f"local-{os.getpid()}-"
        self._serializer = code_serializer()
        self._worker_env = worker_env
        self._workers = workers_per_endpoint
        self._pools: dict[str, ProcessPoolExecutor] = {}
        self._stopped: set[str] = set()
        self._tasks: dict[str, Future[Any]] = {}
        self._lock = threading.Lock()
        self._function_buffers: dict[str, str] = {}
        self._sizes: dict[str, int] = {}

    def start_endpoint(self, endpoint_id: str, workers: int | None = None) -> None:
        with self._lock:
            self._stopped.discard(endpoint_id)
            if endpoint_id in self._pools:
                return
            workers = workers or self._sizes.get(endpoint_id) or self._workers
            self._sizes[endpoint_id] = workers
            pool = ProcessPoolExecutor(
                max_workers=workers,
                # fork is unsafe in a process that already runs server threads.
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_set_environment,
                initargs=(self._worker_env,),
            )
            self._pools[endpoint_id] = pool
        for future in [pool.submit(_warm_up) for _ in range(workers)]:
            future.result(timeout=120)

    def stop_endpoint(self, endpoint_id: str) -> None:
        """Take an endpoint offline, as when a cluster's endpoint stops."""
        with self._lock:
            self._stopped.add(endpoint_id)
            pool = self._pools.pop(endpoint_id, None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def endpoint_status(self, endpoint_id: str) -> EndpointStatus:
        """A stopped pool is offline; any other starts on first use, as an endpoint does."""
        return "offline" if endpoint_id in self._stopped else "online"

    def shutdown(self) -> None:
        for endpoint_id in list(self._pools):
            self.stop_endpoint(endpoint_id)

    def submit(self, endpoint_id: str, function_id: str, kwargs: dict[str, Any]) -> str:
        if endpoint_id in self._stopped:
            raise ServiceUnavailableError(
                f"Compute endpoint {endpoint_id} is offline.", headers={"Retry-After": "30"}
            )
        if endpoint_id not in self._pools:
            self.start_endpoint(endpoint_id)
        if self._callback_base_url and "callback_url" in kwargs:
            path = urllib.parse.urlsplit(kwargs["callback_url"]).path
            kwargs = {**kwargs, "callback_url": self._callback_base_url.rstrip("/") + path}
        arguments = (self._function_buffer(function_id), self._serializer.serialize(kwargs))
        try:
            future = self._pools[endpoint_id].submit(_run_serialized, *arguments)
        except BrokenProcessPool:
            # A worker died (killed, out of memory): its tasks failed, and the pool with them.
            # An endpoint starts new workers; so does this one.
            with self._lock:
                self._pools.pop(endpoint_id, None)
            self.start_endpoint(endpoint_id)
            future = self._pools[endpoint_id].submit(_run_serialized, *arguments)
        task_id = f"{self._prefix}{uuid.uuid4()}"
        with self._lock:
            self._tasks[task_id] = future
        return task_id

    def task_state(self, task_id: str) -> TaskState:
        future = self._tasks.get(task_id)
        if future is None and task_id.startswith("local-") and not task_id.startswith(self._prefix):
            # Another gateway process's pool (first-gateway dev --join): only it can tell.
            return TaskState("pending")
        if future is None:
            return TaskState("unknown", error="no such task on this local pool")
        if not future.done():
            return TaskState("pending")
        error = future.exception()
        if error is not None:
            return TaskState("failed", error=f"{type(error).__name__}: {error}"[:2000])
        return TaskState("success", result=future.result())

    def _function_buffer(self, function_id: str) -> str:
        buffer = self._function_buffers.get(function_id)
        if buffer is None:
            from compute_funcs import FUNCTIONS

            name = function_id.removeprefix("local:")
            if name not in FUNCTIONS:
                raise ServiceUnavailableError(f"Function {function_id} is not registered locally.")
            buffer = self._serializer.serialize(FUNCTIONS[name])
            self._function_buffers[function_id] = buffer
        return buffer


_backend: ComputeBackend | None = None


def set_backend(backend: ComputeBackend) -> None:
    """Install the backend this process uses (the local stack installs its pool)."""
    global _backend
    _backend = backend


def get_backend() -> ComputeBackend:
    global _backend
    if _backend is None:
        from first_core.settings import get_settings

        if get_settings().compute_backend != "globus":
            raise RuntimeError(
                "No local compute pool in this process; start it with first-gateway dev"
            )
        _backend = GlobusComputeBackend()
    return _backend
