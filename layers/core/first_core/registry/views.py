"""What the control plane shows of the registry and its live status: FIRST's
`list-endpoints`, a cluster's jobs, and the per-cluster status page."""

from __future__ import annotations

from typing import Any

from first_core.auth import Caller
from first_core.errors import NotFoundError
from first_core.registry import Registry
from first_core.registry.routing import may_use, state

JOB_STATES = ("running", "starting", "queued", "stopped")


def list_endpoints(registry: Registry, who: Caller) -> dict[str, Any]:
    """FIRST's shape: clusters → base_url, frameworks → models and the OpenAI paths."""
    clusters: dict[str, Any] = {}
    for endpoint in registry.endpoints:
        if not may_use(who, registry, endpoint):
            continue
        known = registry.clusters.get(endpoint.cluster)
        cluster = clusters.setdefault(
            endpoint.cluster,
            {
                "base_url": f"/resource_server/v1/{endpoint.cluster}",
                "status": known.status if known else "unknown",
                "frameworks": {},
            },
        )
        framework = cluster["frameworks"].setdefault(
            endpoint.framework,
            {
                "models": [],
                "endpoints": {
                    "chat": f"/{endpoint.framework}/v1/chat/completions",
                    "completion": f"/{endpoint.framework}/v1/completions",
                    "embedding": f"/{endpoint.framework}/v1/embeddings",
                },
            },
        )
        framework["models"].append(endpoint.model)
    for cluster in clusters.values():
        for framework in cluster["frameworks"].values():
            framework["models"].sort()
    return {"clusters": dict(sorted(clusters.items()))}


def jobs(registry: Registry, who: Caller, cluster: str) -> dict[str, Any]:
    """The cluster's models by state (running, starting, queued, stopped), as last polled."""
    known = registry.cluster(cluster)
    by_state: dict[str, list[dict[str, Any]]] = {s: [] for s in JOB_STATES}
    others: list[dict[str, Any]] = []
    for endpoint in registry.endpoints:
        if endpoint.cluster != cluster or not may_use(who, registry, endpoint):
            continue
        entry = {
            "model": endpoint.model,
            "framework": endpoint.framework,
            "endpoint_id": endpoint.endpoint_id,
            "state": endpoint.status,
        }
        by_state.get(endpoint.status, others).append(entry)
    return {
        "cluster": cluster,
        "status": known.status,
        "free_nodes": known.free_nodes,
        **by_state,
        # Endpoints whose model state the poller could not tell (online) or that are offline.
        "others": others,
    }


def status(registry: Registry) -> dict[str, Any]:
    """Per cluster, for anyone: its status, free nodes and how many models are in each state."""
    clusters: dict[str, Any] = {}
    for name, cluster in sorted(registry.clusters.items()):
        counts = dict.fromkeys((*JOB_STATES, "offline", "online"), 0)
        for endpoint in registry.endpoints:
            if endpoint.cluster == name:
                key = state(registry, endpoint)
                counts[key] = counts.get(key, 0) + 1
        clusters[name] = {
            "status": cluster.status,
            "free_nodes": cluster.free_nodes,
            "frameworks": cluster.frameworks,
            "models": {k: v for k, v in counts.items() if k in (*JOB_STATES, "offline")},
        }
    return {"clusters": clusters}


def models(
    registry: Registry, who: Caller, cluster: str | None = None, framework: str | None = None
) -> dict[str, Any]:
    """`GET /v1/models` (and a cluster's): the models the caller may use, OpenAI's list with
    `clusters` (where each is served) and `states` (cluster → state, as last polled)."""
    served: dict[str, list[str]] = {}
    states: dict[str, dict[str, str]] = {}
    for endpoint in registry.endpoints:
        if (cluster and endpoint.cluster != cluster) or (
            framework and endpoint.framework != framework
        ):
            continue
        if may_use(who, registry, endpoint):
            served.setdefault(endpoint.model, []).append(endpoint.cluster)
            states.setdefault(endpoint.model, {})[endpoint.cluster] = state(registry, endpoint)
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": 0,
                "owned_by": "first",
                "clusters": clusters,
                "states": states[model],
            }
            for model, clusters in sorted(served.items())
        ],
    }


def model(
    registry: Registry,
    who: Caller,
    model_id: str,
    cluster: str | None = None,
    framework: str | None = None,
) -> dict[str, Any]:
    """`GET /v1/models/{id}` (and a cluster's): the model's object as in `models`, or OpenAI's
    404 for a model the caller may not use, worded as for one that does not exist (no leak)."""
    for listed in models(registry, who, cluster, framework)["data"]:
        if listed["id"] == model_id:
            return dict(listed)
    raise NotFoundError(
        f"The model '{model_id}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )
