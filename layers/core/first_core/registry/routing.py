"""Choosing where a request runs: a cluster's endpoint that serves the model, may be used by
the caller, and is up. Federated routes (`/v1/...`) pick among clusters; FIRST's routes
(`/resource_server/v1/{cluster}/{framework}/v1/...`) name the cluster and framework.
"""

from __future__ import annotations

from dataclasses import dataclass

from first_core.auth import Caller
from first_core.errors import (
    NO_RETRY,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from first_core.registry import Endpoint, Registry

# Lower is better. A model already running answers at once; a queued job soon; then a cluster
# with free nodes, then any online one (`online`: the poller could not tell the model's state).
# `starting` (the endpoint is up but has no workers yet) takes no requests while another cluster
# can serve; alone, it answers 503 "starting, retry" rather than piling requests on it.
_PREFERENCE = {"running": 0, "queued": 1, "online": 2, "stopped": 2}
_UNAVAILABLE = {"offline", "maintenance"}
STARTING_RETRY_AFTER = "30"


@dataclass(frozen=True)
class Route:
    """The chosen endpoint and why it was chosen (the `x-first-route-reason` header)."""

    endpoint: Endpoint
    reason: str


def may_use(caller: Caller, registry: Registry, endpoint: Endpoint) -> bool:
    """Whether the caller passes the cluster's and the endpoint's group and domain rules."""
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
    exclude: frozenset[str] = frozenset(),
    for_batches: bool = False,
) -> Route:
    """The endpoint to run on and why. `exclude`: endpoint ids that just refused a submit;
    `for_batches`: only endpoints that take batches."""
    if cluster is not None:
        known = registry.cluster(cluster)
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
    if for_batches:
        # A direct backend's batches are run by the batch driver (first_core.batches.direct).
        candidates = [
            e for e in candidates if e.batches and (e.functions.batch or e.direct is not None)
        ]
        if not candidates:
            where = f"cluster '{cluster}'" if cluster else "any cluster"
            raise InvalidRequestError(
                f"The model '{model}' takes no batches on {where}.",
                param="model",
                code="batches_not_supported",
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
    def state(e: Endpoint) -> str:
        return "offline (submit refused)" if e.endpoint_id in exclude else _status(registry, e)

    available = [
        e
        for e in permitted
        if _status(registry, e) not in _UNAVAILABLE and e.endpoint_id not in exclude
    ]
    if not available:
        states = ", ".join(f"{e.cluster}: {state(e)}" for e in permitted)
        raise ServiceUnavailableError(
            f"No cluster can serve '{model}' right now ({states}). Retry later.",
            # Maintenance or every cluster offline: no retry within the SDK's back-off helps.
            headers={
                "Retry-After": "60",
                "x-first-route-reason": f"no cluster available: {states}",
                **NO_RETRY,
            },
        )
    serving = [e for e in available if _status(registry, e) != "starting"]
    if not serving:
        where = ", ".join(sorted({e.cluster for e in available}))
        raise ServiceUnavailableError(
            f"'{model}' is starting on {where} (the endpoint is online but has no workers "
            f"yet); starting, retry in {STARTING_RETRY_AFTER} s.",
            headers={
                "Retry-After": STARTING_RETRY_AFTER,
                "x-first-route-reason": f"model starting on {where}; retry",
            },
            code="model_starting",
        )
    best = min(serving, key=lambda e: _rank(registry, e))
    status = _status(registry, best)
    if status == "stopped":
        free = _free_nodes(registry, best)
        status = f"stopped, {free} free nodes" if free else "stopped"
    reason = (
        f"named cluster {best.cluster} ({status})"
        if cluster
        else f"{best.cluster}: model {status}; "
        f"{len(serving)} of {len(candidates)} clusters available"
    )
    if exclude:
        refused = {e.cluster for e in candidates if e.endpoint_id in exclude} or exclude
        reason += f"; after {', '.join(sorted(refused))} refused the submit"
    return Route(endpoint=best, reason=reason)


def _free_nodes(registry: Registry, endpoint: Endpoint) -> int:
    cluster = registry.clusters.get(endpoint.cluster)
    return (cluster.free_nodes or 0) if cluster is not None else 0


def _rank(registry: Registry, endpoint: Endpoint) -> tuple[int, int]:
    status = _status(registry, endpoint)
    preference = _PREFERENCE.get(status, 3)
    free = _free_nodes(registry, endpoint)
    if status == "stopped" and not free:
        preference = 3  # nothing to start it on: after any online cluster
    return (preference, -free)


def state(registry: Registry, endpoint: Endpoint) -> str:
    """The endpoint's state as the router sees it: the cluster's when it is down."""
    return _status(registry, endpoint)


def _status(registry: Registry, endpoint: Endpoint) -> str:
    cluster = registry.clusters.get(endpoint.cluster)
    if cluster is not None and cluster.status in _UNAVAILABLE:
        return cluster.status
    return endpoint.status
