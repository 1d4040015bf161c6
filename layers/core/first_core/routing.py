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
    return refusal(caller, registry, endpoint) is None


def refusal(caller: Caller, registry: Registry, endpoint: Endpoint) -> str | None:
    """Why `caller` may not use `endpoint` (None: they may).

    Groups: the cluster's and the model's allowed groups must each be met. Domains: the
    cluster's and the model's allowed identity-provider domains likewise; a service account
    (a listed Globus client identity) has no identity provider and skips the domain checks.
    """
    cluster = registry.clusters.get(endpoint.cluster)
    where = {"cluster": "the cluster", "model": "the model"}
    groups = {
        "cluster": cluster.allowed_groups if cluster else [],
        "model": endpoint.allowed_groups,
    }
    for scope, allowed in groups.items():
        if allowed and not caller.groups & set(allowed):
            return (
                f"{where[scope]} is open only to members of the Globus groups "
                f"{', '.join(allowed)}; ask the facility for access"
            )
    if caller.is_service_account:
        return None
    domains = {
        "cluster": cluster.allowed_domains if cluster else [],
        "model": endpoint.allowed_domains,
    }
    for scope, allowed in domains.items():
        if allowed and caller.idp_domain.lower() not in {d.lower() for d in allowed}:
            return (
                f"you signed in through {caller.idp_domain or 'an unknown provider'}, but "
                f"{where[scope]} accepts only identities from {', '.join(allowed)}; log out "
                "of Globus and sign in with a linked identity from one of those"
            )
    return None


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
    reasons = {id(e): refusal(caller, registry, e) for e in candidates}
    permitted = [e for e in candidates if reasons[id(e)] is None]
    if not permitted:
        raise PermissionDeniedError(
            " ".join(
                f"{caller.username} may not use '{model}' on cluster '{e.cluster}': "
                f"{reasons[id(e)]}."
                for e in candidates
            )
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
