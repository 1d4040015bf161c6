"""Choosing where a request runs: a cluster's endpoint that serves the model, may be used by
the caller, and is up. Federated routes (`/v1/...`) pick among clusters; FIRST's routes
(`/resource_server/v1/{cluster}/{framework}/v1/...`) name the cluster and framework.
"""

from __future__ import annotations

from dataclasses import dataclass

from first_core.auth import Caller
from first_core.errors import NotFoundError, PermissionDeniedError, ServiceUnavailableError
from first_core.registry import Endpoint, Registry

# Lower is better. A model already running answers at once; one starting or queued soon.
_PREFERENCE = {"running": 0, "starting": 1, "queued": 1, "online": 2}
_UNAVAILABLE = {"offline", "maintenance"}


@dataclass(frozen=True)
class Route:
    endpoint: Endpoint
    reason: str


def may_use(caller: Caller, registry: Registry, endpoint: Endpoint) -> bool:
    cluster = registry.clusters.get(endpoint.cluster)
    for allowed in (cluster.allowed_groups if cluster else [], endpoint.allowed_groups):
        if allowed and not caller.groups & set(allowed):
            return False
    if cluster and cluster.allowed_domains:
        return caller.idp_domain in {d.lower() for d in cluster.allowed_domains}
    return True


def choose(
    registry: Registry,
    caller: Caller,
    model: str,
    cluster: str | None = None,
    framework: str | None = None,
) -> Route:
    if cluster is not None:
        known = registry.clusters.get(cluster)
        if known is None:
            raise NotFoundError(
                f"Cluster '{cluster}' does not exist. Known clusters: "
                f"{', '.join(sorted(registry.clusters))}.",
                param="cluster",
                code="cluster_not_found",
            )
        if framework is not None and framework not in known.frameworks:
            raise NotFoundError(
                f"Framework '{framework}' is not served on cluster '{cluster}' "
                f"(it serves: {', '.join(known.frameworks)}).",
                param="framework",
                code="framework_not_found",
            )
    candidates = [
        e
        for e in registry.endpoints
        if e.model == model
        and (cluster is None or e.cluster == cluster)
        and (framework is None or e.framework == framework)
    ]
    if not candidates:
        where = f" on cluster '{cluster}'" if cluster else ""
        raise NotFoundError(
            f"The model '{model}' does not exist{where}. "
            "GET /v1/models lists the models you can use.",
            param="model",
            code="model_not_found",
        )
    permitted = [e for e in candidates if may_use(caller, registry, e)]
    if not permitted:
        raise PermissionDeniedError(
            f"{caller.username} is not in a group allowed to use '{model}'"
            + (f" on cluster '{cluster}'." if cluster else ".")
        )
    available = [e for e in permitted if _status(registry, e) not in _UNAVAILABLE]
    if not available:
        states = ", ".join(f"{e.cluster}: {_status(registry, e)}" for e in permitted)
        raise ServiceUnavailableError(
            f"No cluster can serve '{model}' right now ({states}). Retry later.",
            headers={"Retry-After": "60"},
        )
    best = min(available, key=lambda e: _PREFERENCE.get(_status(registry, e), 3))
    status = _status(registry, best)
    reason = (
        f"named cluster {best.cluster} ({status})"
        if cluster
        else f"{best.cluster}: model {status}; "
        f"{len(available)} of {len(candidates)} clusters available"
    )
    return Route(endpoint=best, reason=reason)


def _status(registry: Registry, endpoint: Endpoint) -> str:
    cluster = registry.clusters.get(endpoint.cluster)
    if cluster is not None and cluster.status in _UNAVAILABLE:
        return cluster.status
    return endpoint.status
