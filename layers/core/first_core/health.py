"""The health poller: each endpoint's status and each model's state, into the registry table.

For every Globus Compute endpoint in the registry: its status from the compute backend, then,
when it is online and has a qstat function, that function's answer (submitted, waited on for a
bounded time). Endpoint rows get running / starting / queued / stopped / offline (online when
qstat could not say); cluster rows get online or offline and the free nodes. A cluster in
maintenance (the registry's `maintenance`, or `set_maintenance`) stays in maintenance.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pynamodb.expressions.update import Action

from first_core.compute import ComputeBackend, get_backend
from first_core.registry import CLUSTER_KEY, Registry
from first_core.tables import RegistryEntry, iter_registry

log = logging.getLogger("first.health")

MODEL_STATES = {"running", "starting", "queued", "stopped"}


@dataclass
class EndpointReport:
    endpoint_id: str
    cluster: str
    status: str  # online | offline
    models: dict[str, str] = field(default_factory=dict)  # model -> state written
    free_nodes: int | None = None
    error: str | None = None


@dataclass
class HealthReport:
    endpoints: dict[str, EndpointReport] = field(default_factory=dict)
    clusters: dict[str, str] = field(default_factory=dict)  # cluster -> status written
    free_nodes: dict[str, int | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "clusters": {
                name: {"status": status, "free_nodes": self.free_nodes.get(name)}
                for name, status in self.clusters.items()
            },
            "endpoints": {
                eid: {
                    "cluster": r.cluster,
                    "status": r.status,
                    "models": r.models,
                    "error": r.error,
                }
                for eid, r in self.endpoints.items()
            },
        }


def _qstat(
    backend: ComputeBackend, endpoint_id: str, function_id: str, models: list[str], wait: float
) -> tuple[dict[str, Any] | None, str | None]:
    try:
        task_id = backend.submit(endpoint_id, function_id, {"models": models})
    except Exception as error:
        return None, f"qstat not submitted: {error}"
    deadline = time.monotonic() + wait
    delay = 0.05
    while True:
        state = backend.task_state(task_id)
        if state.status == "success":
            return (state.result if isinstance(state.result, dict) else None), None
        if state.status in {"failed", "unknown"}:
            return None, f"qstat {state.status}: {state.error}"
        if time.monotonic() > deadline:
            return None, f"qstat did not answer within {wait:.0f} s"
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def poll(backend: ComputeBackend | None = None, qstat_wait: float = 20.0) -> HealthReport:
    backend = backend or get_backend()
    rows = list(iter_registry())
    registry = Registry.from_rows(rows)
    report = HealthReport()
    by_endpoint: dict[str, list[Any]] = {}
    for endpoint in registry.endpoints:
        by_endpoint.setdefault(endpoint.endpoint_id, []).append(endpoint)

    for endpoint_id, endpoints in by_endpoint.items():
        cluster = endpoints[0].cluster
        status = backend.endpoint_status(endpoint_id)
        entry = EndpointReport(endpoint_id, cluster, status)
        report.endpoints[endpoint_id] = entry
        if status != "online":
            # No workers to run qstat on: every model there is starting, or the endpoint is down.
            entry.models = {
                e.model: "starting" if status == "starting" else "offline" for e in endpoints
            }
            continue
        function_id = next((e.functions.qstat for e in endpoints if e.functions.qstat), None)
        answer: dict[str, Any] | None = None
        if function_id is not None:
            models = sorted({e.model for e in endpoints})
            answer, entry.error = _qstat(backend, endpoint_id, function_id, models, qstat_wait)
        states = (answer or {}).get("models") or {}
        if answer is not None:
            entry.error = answer.get("error")
            entry.free_nodes = answer.get("free_nodes")
        # A clean answer is the whole truth (a model it omits is stopped); one with an error
        # is believed only where it saw a job: otherwise the state is unknown ("online").
        trusted = answer is not None and not answer.get("error")
        for e in endpoints:
            state = states.get(e.model, "stopped" if trusted else None)
            if state == "stopped" and not trusted:
                state = None
            entry.models[e.model] = state if state in MODEL_STATES else "online"

    now = time.time()
    written: dict[tuple[str, str], str] = {}
    for entry in report.endpoints.values():
        for e in by_endpoint[entry.endpoint_id]:
            written[(e.cluster, f"{e.framework}#{e.model}")] = entry.models[e.model]
    for row in rows:
        if row.key == CLUSTER_KEY:
            ours = [r for r in report.endpoints.values() if r.cluster == row.cluster]
            online = any(r.status in ("online", "starting") for r in ours)
            known = [r.free_nodes for r in ours if r.free_nodes is not None]
            free = sum(known) if known else None
            if (row.config or {}).get("maintenance"):
                cluster_status = "maintenance"
            else:
                cluster_status = "online" if online or not ours else "offline"
            report.clusters[row.cluster] = cluster_status
            report.free_nodes[row.cluster] = free
            _update(row, cluster_status, now, free_nodes=free)
        elif (row.cluster, row.key) in written:
            _update(row, written[(row.cluster, row.key)], now)
    Registry.invalidate()
    return report


def _update(row: RegistryEntry, status: str, now: float, **extra: Any) -> None:
    actions: list[Action] = [RegistryEntry.status.set(status), RegistryEntry.updated_at.set(now)]
    if "free_nodes" in extra:
        free = extra["free_nodes"]
        column = RegistryEntry.free_nodes
        actions.append(column.set(free) if free is not None else column.remove())
    try:
        # Only rows that still exist: a registry load may have removed it meanwhile.
        row.update(actions=actions, condition=RegistryEntry.cluster.exists())
    except Exception:
        log.warning("registry row %s/%s not updated", row.cluster, row.key, exc_info=True)


def set_maintenance(cluster: str, on: bool) -> None:
    """An operator puts a cluster in maintenance (or takes it out); the poller keeps it."""
    try:
        row = RegistryEntry.get(cluster, CLUSTER_KEY, consistent_read=True)
    except RegistryEntry.DoesNotExist:
        raise KeyError(cluster) from None
    config = dict(row.config or {})
    config["maintenance"] = on
    row.update(
        actions=[
            RegistryEntry.config.set(config),
            RegistryEntry.status.set("maintenance" if on else "online"),
            RegistryEntry.updated_at.set(time.time()),
        ]
    )
    Registry.invalidate()
