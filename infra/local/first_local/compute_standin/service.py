"""The Globus Compute web service, as the real `globus-compute-sdk` `Client` sees it.

The routes the Client uses, with the shapes the service sends (facts and citations:
`../shared/notes/globus-compute-service.md`):

    GET  /v2/version                     {"api", "min_sdk_version", "min_ep_version"}
    POST /v3/functions, /v2/functions    register → {"function_uuid"}
    GET  /v2/functions/{function_id}
    POST /v3/endpoints/{endpoint_id}/submit
                                         → {"request_id", "task_group_id", "endpoint_id",
                                            "tasks": {function_id: [task_id, ...]}}
    GET  /v2/tasks/{task_id}             pending {"task_id", "status"}; done adds "result"
                                         (Compute-serialized) or "exception" (the traceback),
                                         "completion_t" and "details"
    POST /v2/batch_status                {"response": "batch", "results": {task_id: doc}}
    GET  /v2/endpoints/{endpoint_id}/status
                                         {"status": "online", "details": heartbeat} | offline
    GET  /v2/taskgroup/{task_group_id}   {"taskgroup_id", "tasks": [{"id", "created_at"}]}

Every call needs a Globus Auth token for the Compute scope (the Auth stand-in's
`client_credentials` grant) and counts against the service's documented limit of 20 API
requests per 10 s per client identity, answered 429 with `Retry-After` beyond it
(`--compute-api-limit`; docs/limits.rst in github.com/globus/globus-compute). A submit body over
10 MB is refused 413, as the service does; results over 10 MiB fail on the endpoint itself.

Control routes for the local stack and tests, under `/_standin/`: `calls` (counts by route and by
client, and `throttled`), `endpoints` (each endpoint's state), `endpoints/{id or name}/stop`
and `/start`, `workers-arrive` (the start delay counts from now).
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from globus_compute_common.messagepack.message_types import Result
from globus_compute_sdk import __version__ as SDK_VERSION
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from compute_funcs.register import code_serializer
from first_local.compute_standin import worker
from first_local.compute_standin.endpoints import LocalEndpoint, QueuedTask, pack_task
from first_local.compute_standin.limits import ApiLimit, SlidingWindow
from first_local.globus_standin import COMPUTE_SCOPE, client_token_claims

MAX_SUBMIT_BYTES = 10 * 1024 * 1024  # docs/limits.rst: 10 MB per submission
# What the Client checks its own version against at start.
MIN_VERSIONS = {"min_sdk_version": "2.0.0", "min_ep_version": "2.0.0"}
_PENDING = {"waiting-for-ep", "waiting-for-nodes", "waiting-for-launch", "running"}


@dataclass
class TaskRecord:
    task_id: str
    endpoint_id: str
    function_id: str
    task_group_id: str
    status: str
    result: str | None = None
    exception: str | None = None
    completion_t: str | None = None
    details: dict[str, Any] | None = None

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"task_id": self.task_id, "status": self.status}
        if self.status in _PENDING:
            return doc
        doc["completion_t"] = self.completion_t
        if self.details is not None:
            doc["details"] = self.details
        if self.exception is not None:
            doc["exception"] = self.exception
        else:
            doc["result"] = self.result
        return doc


@dataclass
class Faults:
    """Fractions of tasks whose function raises (`--fail-compute`), or whose worker process is
    killed under it (`--kill-workers`)."""

    fail: float = 0.0
    kill: float = 0.0


@dataclass
class ComputeService:
    """The service's state: functions, tasks and endpoints, in memory."""

    limit: ApiLimit = field(default_factory=ApiLimit)
    faults: Faults = field(default_factory=Faults)
    token_secret: str | None = None
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    groups: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # id → (task, when)
    endpoints: dict[str, LocalEndpoint] = field(default_factory=dict)
    by_route: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    # When each client's calls came (monotonic): their count, and the busiest window.
    stamps: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._window = SlidingWindow(self.limit)
        self._lock = threading.Lock()
        self._code = code_serializer()  # how the gateway registers them: as source
        self._fault_code = {
            name: self._function_code(function)
            for name, function in (
                ("fail", worker.injected_failure),
                ("kill", worker.killed_mid_task),
                ("warm", worker.warm_up),
            )
        }

    def set_limit(self, limit: ApiLimit) -> None:
        self.limit = limit
        self._window = SlidingWindow(limit)

    # ---- endpoints -------------------------------------------------------------------------

    def add_endpoint(
        self,
        endpoint_id: str,
        name: str,
        workers: int,
        worker_env: dict[str, str],
        run_dir: Path,
    ) -> LocalEndpoint:
        endpoint = LocalEndpoint(
            str(uuid.UUID(endpoint_id)),
            name,
            workers,
            worker_env,
            run_dir,
            on_started=self._started,
            on_result=self._finished,
        )
        self.endpoints[endpoint.endpoint_id] = endpoint
        return endpoint

    def endpoint(self, id_or_name: str) -> LocalEndpoint | None:
        found = self.endpoints.get(id_or_name.lower())
        return found or next((e for e in self.endpoints.values() if e.name == id_or_name), None)

    def warm_task(self) -> bytes:
        empty = self._code.pack_buffers([self._code.serialize(()), self._code.serialize({})])
        return pack_task(str(uuid.uuid4()), self._fault_code["warm"], empty)

    # ---- functions and tasks ---------------------------------------------------------------

    def _function_code(self, function: Any) -> str:
        return str(self._code.pack_buffers([self._code.serialize(function)]))

    def register(self, body: dict[str, Any]) -> str:
        name = str(body.get("function_name") or "")
        code = body.get("function_code")
        if not name or not isinstance(code, str):
            raise _ApiError(400, "INVALID_FUNCTION", "function_name and function_code required")
        if body.get("serialized") is False:
            # Source text: the service stores it as PureSourceTextInspect would have sent it.
            code = self._code.pack_buffers([f"st\n{name}:{code}"])
        function_id = str(uuid.uuid4())
        self.functions[function_id] = {
            "function_uuid": function_id,
            "function_name": name,
            "function_code": code,
            "description": body.get("description"),
            "metadata": body.get("meta"),
        }
        return function_id

    def submit(self, endpoint_id: str, body: dict[str, Any]) -> dict[str, Any]:
        endpoint = self.endpoints.get(endpoint_id.lower())
        if endpoint is None:
            raise _ApiError(404, "ENDPOINT_NOT_FOUND", f"Endpoint {endpoint_id} not found")
        tasks = body.get("tasks")
        if not isinstance(tasks, dict) or not tasks:
            raise _ApiError(400, "INVALID_REQUEST", "tasks: a map of function ids to payloads")
        unknown = [f for f in tasks if str(f).lower() not in self.functions]
        if unknown:
            raise _ApiError(404, "FUNCTION_NOT_FOUND", f"Function {unknown[0]} not found")
        group = str(body.get("task_group_id") or uuid.uuid4())
        answer: dict[str, list[str]] = {}
        for function_id, payloads in tasks.items():
            code = self.functions[str(function_id).lower()]["function_code"]
            ids = answer.setdefault(function_id, [])  # keyed as received: the Client looks it up
            for payload in payloads:
                task_id = str(uuid.uuid4())
                packed = self._task(task_id, str(code), str(payload))
                with self._lock:
                    self.tasks[task_id] = TaskRecord(
                        task_id, endpoint.endpoint_id, function_id, group, "waiting-for-ep"
                    )
                    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
                    self.groups.setdefault(group, []).append((task_id, created))
                status = endpoint.submit(QueuedTask(task_id, str(function_id).lower(), packed))
                self._set_status(task_id, status)
                ids.append(task_id)
        return {
            "request_id": str(uuid.uuid4()),
            "task_group_id": group,
            "endpoint_id": endpoint.endpoint_id,
            "tasks": answer,
        }

    def _task(self, task_id: str, code: str, payload: str) -> bytes:
        """The packed task, or, for the fraction the fault switches name, its stand-in."""
        roll = random.random()
        if roll < self.faults.fail:
            code = self._fault_code["fail"]
        elif roll < self.faults.fail + self.faults.kill:
            # The real function travels as the killer's first argument.
            [function] = self._code.unpack_buffers(code)
            ser_args, ser_kwargs = self._code.unpack_buffers(payload)
            args = (function, random.uniform(0.0, 0.2), *self._code.deserialize(ser_args))
            payload = self._code.pack_buffers([self._code.serialize(args), ser_kwargs])
            code = self._fault_code["kill"]
        return pack_task(task_id, code, payload)

    def _set_status(self, task_id: str, status: str) -> None:
        with self._lock:
            record = self.tasks.get(task_id)
            if record is not None and record.status in _PENDING:
                record.status = status

    def _started(self, task_id: str) -> None:
        self._set_status(task_id, "running")

    def _finished(self, task_id: str, result: Result) -> None:
        with self._lock:
            record = self.tasks.get(task_id)
            if record is None:
                return
            record.completion_t = str(time.time())
            record.details = json.loads(json.dumps(result.details or {}, default=str))
            if result.is_error:
                record.status, record.exception = "failed", result.data
            else:
                record.status, record.result = "success", result.data

    def task_document(self, task_id: str) -> dict[str, Any] | None:
        with self._lock:
            record = self.tasks.get(task_id.lower())
            return record.document() if record is not None else None

    # ---- calls and limits ------------------------------------------------------------------

    def admit(self, request: Request, route: str) -> str:
        """The calling client's id, once its token and the limit allow the call."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        claims = client_token_claims(token.strip(), self.token_secret)
        if (
            scheme.lower() != "bearer"
            or claims is None
            or COMPUTE_SCOPE not in str(claims.get("scope", "")).split()
        ):
            raise _ApiError(401, "AUTHENTICATION_ERROR", "Bad or missing bearer token")
        client = str(claims["sub"])
        with self._lock:
            self.by_route[route] += 1
            self.stamps.setdefault(client, []).append(time.monotonic())
        wait = self._window.take(client)
        if wait:
            with self._lock:
                self.throttled += 1
            raise _ApiError(
                429,
                "TOO_MANY_REQUESTS",
                f"Rate limit exceeded: at most {self.limit.requests} API requests per "
                f"{self.limit.seconds:g} s per client",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        return client

    def calls(self) -> dict[str, Any]:
        with self._lock:
            return {
                "routes": dict(self.by_route),
                "clients": {client: len(stamps) for client, stamps in self.stamps.items()},
                "throttled": self.throttled,
                "total": sum(self.by_route.values()),
                "limit": str(self.limit),
                "tasks": len(self.tasks),
                "busiest_window": self._busiest_window(),
            }

    def _busiest_window(self) -> dict[str, float]:
        """The most calls one client made in any sliding window of the limit's length (10 s
        when there is no limit): what the service would have counted at its worst moment."""
        seconds = self.limit.seconds if self.limit.requests else 10.0
        most = 0
        for stamps in self.stamps.values():
            start = 0
            for end, stamp in enumerate(stamps):
                while stamps[start] <= stamp - seconds:
                    start += 1
                most = max(most, end - start + 1)
        return {"seconds": seconds, "calls": most}


class _ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> JSONResponse:
        body = {"code": self.code, "message": self.message, "http_status_code": self.status}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def create_app(service: ComputeService) -> Starlette:
    """The Globus Compute web service's routes the SDK calls, over `service`: authenticated,
    counted, limited, answering in the service's shapes."""
    def api(route: str, handler: Any) -> Any:
        """An API route: authenticated, counted, limited; errors in the service's shape."""

        async def endpoint(request: Request) -> Response:
            try:
                service.admit(request, route)
                return JSONResponse(await handler(request))
            except _ApiError as error:
                return error.response()

        return endpoint

    async def version(request: Request) -> dict[str, Any]:
        return {"api": "v3", "sdk": SDK_VERSION, **MIN_VERSIONS}

    async def register(request: Request) -> dict[str, Any]:
        return {"function_uuid": service.register(await _json(request))}

    async def get_function(request: Request) -> dict[str, Any]:
        found = service.functions.get(request.path_params["function_id"].lower())
        if found is None:
            raise _ApiError(404, "FUNCTION_NOT_FOUND", "Function not found")
        return found

    async def submit(request: Request) -> dict[str, Any]:
        body = await request.body()
        if len(body) > MAX_SUBMIT_BYTES:
            raise _ApiError(
                413,
                "TASK_PAYLOAD_TOO_LARGE",
                f"Submission is {len(body)} bytes; the limit is {MAX_SUBMIT_BYTES}",
            )
        return service.submit(request.path_params["endpoint_id"], _parse(body))

    async def task(request: Request) -> dict[str, Any]:
        doc = service.task_document(request.path_params["task_id"])
        if doc is None:
            raise _ApiError(404, "TASK_NOT_FOUND", "Task not found")
        return doc

    async def batch_status(request: Request) -> dict[str, Any]:
        task_ids = (await _json(request)).get("task_ids") or []
        results = {
            str(task_id): service.task_document(str(task_id))
            or {"task_id": str(task_id), "status": "failed", "reason": "Unknown task id"}
            for task_id in task_ids
        }
        return {"response": "batch", "results": results}

    async def task_group(request: Request) -> dict[str, Any]:
        group_id = request.path_params["task_group_id"].lower()
        tasks = service.groups.get(group_id)
        if tasks is None:
            raise _ApiError(404, "TASK_GROUP_NOT_FOUND", "Task group not found")
        return {
            "taskgroup_id": group_id,
            "create_websockets_queue": False,
            "tasks": [{"id": task_id, "created_at": when} for task_id, when in tasks],
        }

    async def endpoint_status(request: Request) -> dict[str, Any]:
        found = service.endpoints.get(request.path_params["endpoint_id"].lower())
        if found is None:
            raise _ApiError(404, "ENDPOINT_NOT_FOUND", "Endpoint not found")
        return found.status()

    async def calls(request: Request) -> JSONResponse:
        return JSONResponse(service.calls())

    async def endpoints(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                e.endpoint_id: {"name": e.name, "workers": e.size, **e.status()}
                for e in service.endpoints.values()
            }
        )

    async def switch(request: Request) -> JSONResponse:
        found = service.endpoint(request.path_params["endpoint"])
        action = request.path_params["action"]
        if found is None or action not in ("stop", "start"):
            return JSONResponse({"error": "no such endpoint or action"}, status_code=404)
        if action == "stop":
            found.stop()
        else:
            found.start()
        return JSONResponse({"endpoint_id": found.endpoint_id, **found.status()})

    async def workers_arrive(request: Request) -> JSONResponse:
        seconds = float(request.query_params.get("in", "0"))
        for found in service.endpoints.values():
            found.workers_arrive(seconds)
        return JSONResponse({"workers_in": seconds})

    routes = [
        ("GET", "/v2/version", version),
        ("POST", "/v3/functions", register),
        ("POST", "/v2/functions", register),
        ("GET", "/v2/functions/{function_id}", get_function),
        ("POST", "/v3/endpoints/{endpoint_id}/submit", submit),
        ("GET", "/v2/tasks/{task_id}", task),
        ("POST", "/v2/batch_status", batch_status),
        ("GET", "/v2/endpoints/{endpoint_id}/status", endpoint_status),
        ("GET", "/v2/taskgroup/{task_group_id}", task_group),
    ]
    return Starlette(
        routes=[
            *(
                Route(path, api(f"{method} {path}", handler), methods=[method])
                for method, path, handler in routes
            ),
            Route("/_standin/calls", calls),
            Route("/_standin/endpoints", endpoints),
            Route("/_standin/endpoints/{endpoint}/{action:str}", switch, methods=["POST"]),
            Route("/_standin/workers-arrive", workers_arrive, methods=["POST"]),
        ]
    )


async def _json(request: Request) -> dict[str, Any]:
    return _parse(await request.body())


def _parse(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        raise _ApiError(400, "INVALID_JSON", "The body is not JSON") from None
    if not isinstance(parsed, dict):
        raise _ApiError(400, "INVALID_JSON", "The body must be a JSON object")
    return parsed
