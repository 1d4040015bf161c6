"""A cluster's Globus Compute endpoint, without the cluster: real engines, fed as the
endpoint's interchange feeds them.

A real endpoint's interchange takes packed tasks off its AMQP queue and makes one call per task,
`engine.submit(GCFuture(task_id, function_id=...), packed_task, resource_specification,
result_serializers)`; the future resolves to a packed `Result` that it sends back. Here the
stand-in's submit route plays the queue and `LocalEndpoint` the interchange, with the engine that
does the work unchanged: `globus_compute_endpoint`'s `ProcessPoolEngine`, whose `execute_task`
unpacks the task, deserializes the function and its arguments, runs it, and packs the result or
the traceback, with its 10 MiB result limit.

Each worker is a single-worker engine and gets a task only when idle, as HTEX's manager hands
tasks to workers. So a worker that dies (killed, out of memory) fails only the task it held, and
only its engine is replaced, the way a real endpoint's manager starts a new worker; a pool-wide
`ProcessPoolExecutor` would instead fail every task in flight and stay broken.

An endpoint that is stopped takes tasks and keeps them (`waiting-for-ep`) until it starts again,
as the real service queues tasks for an offline endpoint. An endpoint may also be up with no
workers for a while (`--endpoint-start-delay`: its batch job still queued): it reports
`total_workers: 0` and holds tasks (`waiting-for-nodes`) until the workers arrive.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Result, Task
from globus_compute_endpoint.engines import ProcessPoolEngine
from globus_compute_endpoint.engines.base import GCFuture

from first_local.compute_standin.worker import prepare_worker

log = logging.getLogger("first.compute_standin")

# How often a real endpoint sends its heartbeat (status) to the service.
HEARTBEAT_PERIOD_S = 30


def pack_task(task_id: str, function_code: str, payload: str) -> bytes:
    """The message an endpoint receives: the service appends the task's packed arguments to the
    function's stored code, giving the three buffers `execute_task` unpacks."""
    task = Task(task_id=uuid.UUID(task_id), task_buffer=function_code + payload)
    return bytes(messagepack.pack(task))


@dataclass
class QueuedTask:
    task_id: str
    function_id: str
    packed: bytes


@dataclass
class _Worker:
    engine: ProcessPoolEngine
    task_id: str | None = None


class LocalEndpoint:
    """One endpoint: `workers` single-worker engines, a queue, and what its heartbeat says."""

    def __init__(
        self,
        endpoint_id: str,
        name: str,
        workers: int,
        worker_env: dict[str, str],
        run_dir: Path,
        on_started: Callable[[str], None],
        on_result: Callable[[str, Result], None],
    ) -> None:
        self.endpoint_id = endpoint_id
        self.name = name
        self.size = workers
        self._worker_env = worker_env
        self._run_dir = run_dir
        self._on_started = on_started
        self._on_result = on_result
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._queue: deque[QueuedTask] = deque()
        self.online = False
        # Workers take tasks from this instant (monotonic); inf: not yet (start delay pending).
        self._workers_from = 0.0
        # Every change of state runs on this one thread, as in an interchange's main loop.
        self._interchange = ThreadPoolExecutor(1, thread_name_prefix=f"interchange-{name}")

    # ---- life ------------------------------------------------------------------------------

    def start(self, workers_in: float = 0.0) -> None:
        """Bring the endpoint online; its workers take tasks `workers_in` seconds from now
        (math.inf: only once `workers_arrive` is called)."""
        with self._lock:
            self.online = True
            self._workers_from = time.monotonic() + workers_in
            while len(self._workers) < self.size:
                self._workers.append(_Worker(self._new_engine()))
        self._after(workers_in)

    def workers_arrive(self, seconds: float) -> None:
        """The start delay counts from now: workers take tasks in `seconds`."""
        with self._lock:
            self._workers_from = time.monotonic() + seconds
        self._after(seconds)

    def stop(self) -> None:
        """Offline: tasks wait for its return. Tasks already running finish and report."""
        with self._lock:
            self.online = False
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.engine.shutdown(block=False)

    def shutdown(self) -> None:
        self.stop()
        self._interchange.shutdown(wait=False, cancel_futures=True)

    def warm_up(self, packed: Callable[[], bytes], timeout: float = 120.0) -> None:
        """Run a no-op task on every worker, so the first real task finds it ready."""
        futures = []
        with self._lock:
            for worker in self._workers:
                future = GCFuture(str(uuid.uuid4()))
                worker.engine.submit(future, packed(), resource_specification={})
                futures.append(future)
        for future in futures:
            result = messagepack.unpack(future.result(timeout=timeout))
            if isinstance(result, Result) and result.is_error:
                raise RuntimeError(f"endpoint {self.name} could not start: {result.data}")

    # ---- tasks -----------------------------------------------------------------------------

    def submit(self, task: QueuedTask) -> str:
        """Queue a task; its status while it waits."""
        with self._lock:
            self._queue.append(task)
            waiting = "waiting-for-ep" if not self.online else "waiting-for-nodes"
        self._interchange.submit(self._dispatch)
        return waiting

    def status(self) -> dict[str, Any]:
        """What `GET /v2/endpoints/{id}/status` answers: the last heartbeat's engine state."""
        with self._lock:
            if not self.online:
                return {"status": "offline"}
            ready = time.monotonic() >= self._workers_from
            workers = len(self._workers) if ready else 0
            busy = sum(1 for w in self._workers if w.task_id is not None)
            state = dict(self._workers[0].engine.get_status_report().global_state)
            queued = len(self._queue)
        state.update(
            total_workers=workers,
            idle_workers=max(workers - busy, 0),
            pending_tasks=queued,
            outstanding_tasks=queued + busy,
            max_workers_per_node=self.size,
            managers=1 if ready else 0,
            active_managers=1 if ready else 0,
            heartbeat_period=HEARTBEAT_PERIOD_S,
            active=True,
        )
        return {"status": "online", "details": state}

    # ---- the interchange -------------------------------------------------------------------

    def _new_engine(self) -> ProcessPoolEngine:
        engine = ProcessPoolEngine(
            max_workers=1,
            # fork is unsafe in a process that already runs server threads.
            mp_context=multiprocessing.get_context("spawn"),
            initializer=prepare_worker,
            initargs=(self._worker_env,),
        )
        engine.start(endpoint_id=uuid.UUID(self.endpoint_id), run_dir=str(self._run_dir))
        return engine

    def _after(self, seconds: float) -> None:
        if math.isfinite(seconds):
            timer = threading.Timer(seconds, self._interchange.submit, args=(self._dispatch,))
            timer.daemon = True
            timer.start()

    def _dispatch(self) -> None:
        started: list[str] = []
        with self._lock:
            if not self.online or time.monotonic() < self._workers_from:
                return
            for worker in self._workers:
                if not self._queue:
                    break
                if worker.task_id is None:
                    task = self._queue.popleft()
                    worker.task_id = task.task_id
                    future = GCFuture(task.task_id, function_id=task.function_id)
                    future.add_done_callback(self._finished_soon(worker))
                    worker.engine.submit(future, task.packed, resource_specification={})
                    started.append(task.task_id)
        for task_id in started:
            self._on_started(task_id)

    def _finished_soon(self, worker: _Worker) -> Callable[[Future[Any]], None]:
        # The engine resolves futures on its executor's own thread: hand over to ours.
        def hand_over(future: Future[Any]) -> None:
            self._interchange.submit(self._finished, worker, future)

        return hand_over

    def _finished(self, worker: _Worker, future: Future[Any]) -> None:
        task_id = worker.task_id
        result = messagepack.unpack(future.result())
        executor = worker.engine.executor
        if executor is not None and getattr(executor, "_broken", False):
            # The worker died under its task: the engine's future carries the loss as an error
            # result; a real endpoint's manager starts a new worker in its place.
            log.warning("endpoint %s: a worker died under task %s", self.name, task_id)
            worker.engine.shutdown(block=False)
            with self._lock:
                if worker in self._workers:
                    worker.engine = self._new_engine()
        worker.task_id = None
        if task_id is not None and isinstance(result, Result):
            self._on_result(task_id, result)
        self._dispatch()
