"""The health poller: each endpoint's status and each model's state, into the registry table.

For every Globus Compute endpoint in the registry: its status from the compute backend, then,
when it is online and has a qstat function, that function's answer (submitted, waited on for a
bounded time). Endpoint rows get running / starting / queued / stopped / offline (online when
qstat could not say); cluster rows get online or offline and the free nodes. A cluster in
maintenance (the registry's `maintenance`, or `set_maintenance`) stays in maintenance.

A direct backend (first_core.inference.direct) is probed instead: `GET {base_url}/models` (or
its `status_url`) with the gateway's key; an answer under 400 makes its models online, anything
else (refused, unreachable, slow) offline. Its `/models` need not list them: the probe says only
up or down.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from pynamodb.exceptions import UpdateError
from pynamodb.expressions.update import Action

from first_core.compute import ComputeBackend, budget, get_backend
from first_core.errors import GatewayError
from first_core.registry import CLUSTER_KEY, DirectBackend, Registry
from first_core.tables import RegistryEntry, iter_registry

log = logging.getLogger("first.health")

MODEL_STATES = {"running", "starting", "queued", "stopped"}
# A direct backend's probe waits at most this long.
PROBE_SECONDS = 5.0


@dataclass
class EndpointReport:
    """One endpoint's poll: its status, qstat's answer or why there is none."""

    endpoint_id: str
    cluster: str
    status: str  # online | offline
    models: dict[str, str] = field(default_factory=dict)  # model -> state written
    free_nodes: int | None = None
    error: str | None = None


@dataclass
class HealthReport:
    """One poll of every endpoint, and the cluster statuses written."""

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


def _qstat_answers(
    backend: ComputeBackend, submitted: dict[str, str], wait: float
) -> dict[str, tuple[dict[str, Any] | None, str | None]]:
    """Each endpoint's qstat answer (or why there is none), reading all the tasks' states in one
    call per round, until they have all ended or `wait` is over."""
    answers: dict[str, tuple[dict[str, Any] | None, str | None]] = {}
    deadline = time.monotonic() + wait
    delay = 0.1
    while submitted:
        states = backend.task_states(list(submitted.values()))
        for endpoint_id, task_id in list(submitted.items()):
            state = states[task_id]
            if state.status == "success":
                result = state.result if isinstance(state.result, dict) else None
                answers[endpoint_id] = (result, None)
            elif state.status in {"failed", "unknown"}:
                answers[endpoint_id] = (None, f"qstat {state.status}: {state.error}")
            else:
                continue
            del submitted[endpoint_id]
        if submitted and time.monotonic() + delay > deadline:
            for endpoint_id in submitted:
                answers[endpoint_id] = (None, f"qstat did not answer within {wait:.0f} s")
            break
        if submitted:
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    return answers


def poll(backend: ComputeBackend | None = None, qstat_wait: float = 20.0) -> HealthReport:
    """Every endpoint's status, then qstat where it is online, into the registry table. Its
    Globus Compute calls are background work of the API budget (first_core.compute.budget): with no
    unit left, an endpoint keeps its last state and qstat is skipped until a later poll."""
    with budget.priority(budget.Priority.BACKGROUND):
        return _poll(backend or get_backend(), qstat_wait)


def _poll(backend: ComputeBackend, qstat_wait: float) -> HealthReport:
    rows = list(iter_registry())
    registry = Registry.from_rows(rows)
    report = HealthReport()
    by_endpoint: dict[str, list[Any]] = {}
    for endpoint in registry.endpoints:
        by_endpoint.setdefault(endpoint.endpoint_id, []).append(endpoint)

    submitted: dict[str, str] = {}
    for endpoint_id, endpoints in by_endpoint.items():
        direct = endpoints[0].direct
        if direct is not None:  # no Globus Compute: its own URL says whether it is up
            status, problem = probe(direct)
            report.endpoints[endpoint_id] = EndpointReport(
                endpoint_id, endpoints[0].cluster, status, error=problem
            )
            continue
        try:
            status = backend.endpoint_status(endpoint_id)
        except budget.BudgetExhausted:
            continue  # not looked at this time: its rows keep their state
        entry = EndpointReport(endpoint_id, endpoints[0].cluster, status)
        report.endpoints[endpoint_id] = entry
        function_id = next((e.functions.qstat for e in endpoints if e.functions.qstat), None)
        if status != "online" or function_id is None:
            continue
        models = sorted({e.model for e in endpoints})
        try:
            submitted[endpoint_id] = backend.submit(endpoint_id, function_id, {"models": models})
        except budget.BudgetExhausted:
            entry.error = "qstat skipped: the Globus Compute API budget is used up"
        except Exception as error:
            entry.error = f"qstat not submitted: {error}"
    try:
        answers = _qstat_answers(backend, submitted, qstat_wait)
    except budget.BudgetExhausted:
        answers = {e: (None, "qstat not read: the API budget is used up") for e in submitted}

    for endpoint_id, entry in report.endpoints.items():
        endpoints = by_endpoint[endpoint_id]
        if entry.status != "online":
            # No workers to run qstat on: every model there is starting, or the endpoint is down.
            entry.models = {
                e.model: "starting" if entry.status == "starting" else "offline" for e in endpoints
            }
            continue
        answer, problem = answers.get(endpoint_id, (None, entry.error))
        entry.error = problem
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
    looked_at = {e.cluster for e in registry.endpoints if e.endpoint_id in report.endpoints}
    skipped = {e.cluster for e in registry.endpoints} - looked_at
    for row in rows:
        if row.key == CLUSTER_KEY and row.cluster in skipped:
            continue  # none of its endpoints was looked at this time: it keeps its status
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


def probe(direct: DirectBackend) -> tuple[str, str | None]:
    """A direct backend's status, `online` or `offline`, and why it is offline (never its key)."""
    from first_core.inference.upstream import api_key

    try:
        key = api_key(direct)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        answer = httpx.get(direct.probe_url, headers=headers, timeout=PROBE_SECONDS)
    except GatewayError as error:
        return "offline", error.message
    except httpx.HTTPError as error:
        return "offline", f"{direct.probe_url} unreachable: {type(error).__name__}"
    if answer.status_code >= 400:
        return "offline", f"{direct.probe_url} answered {answer.status_code}"
    return "online", None


def _update(row: RegistryEntry, status: str, now: float, **extra: Any) -> None:
    actions: list[Action] = [RegistryEntry.status.set(status), RegistryEntry.updated_at.set(now)]
    if "free_nodes" in extra:
        free = extra["free_nodes"]
        column = RegistryEntry.free_nodes
        actions.append(column.set(free) if free is not None else column.remove())
    # Only rows that still exist (a registry load may have removed one meanwhile) and whose
    # status is still the one this poll read: an operator's maintenance switch between the read
    # and this write wins, and the next poll starts from it.
    unchanged = (
        RegistryEntry.status == row.status
        if row.status is not None
        else RegistryEntry.status.does_not_exist()
    )
    try:
        row.update(actions=actions, condition=RegistryEntry.cluster.exists() & unchanged)
    except UpdateError as error:
        if error.cause_response_code == "ConditionalCheckFailedException":
            log.info("registry row %s/%s changed during the poll", row.cluster, row.key)
        else:
            log.warning("registry row %s/%s not updated", row.cluster, row.key, exc_info=True)
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
