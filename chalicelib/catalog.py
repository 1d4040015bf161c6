"""What there is and who you are: health, the models you may use, the clusters' state
(first_core.registry)."""

from __future__ import annotations

from typing import Any

from chalice import Blueprint

from chalicelib.http import authorization, caller, client_address, route
from first_core.auth import get_authenticator
from first_core.errors import NotFoundError
from first_core.registry import Registry, views

catalog = Blueprint(__name__)


@route(catalog, "/health", methods=["GET"])
def health() -> dict[str, Any]:
    """Liveness, and each cluster's status (no auth)."""
    registry = Registry.current()
    return {"status": "ok", "clusters": {c.name: c.status for c in registry.clusters.values()}}


@route(catalog, "/v1/models", methods=["GET"])
def list_models() -> dict[str, Any]:
    """The models the caller may use, as OpenAI's model list."""
    return views.models(Registry.current(), caller())


@route(catalog, "/resource_server/v1/{cluster}/{framework}/v1/models", methods=["GET"])
def list_cluster_models(cluster: str, framework: str) -> dict[str, Any]:
    """The models of one cluster's framework that the caller may use (404 for an unknown one)."""
    who = caller()
    registry = Registry.current()
    known = registry.clusters.get(cluster)
    if known is None or framework not in known.frameworks:
        raise NotFoundError(f"No framework '{framework}' on cluster '{cluster}'.", param="cluster")
    return views.models(registry, who, cluster, framework)


@route(catalog, "/resource_server/v1/whoami", methods=["GET"])
def whoami() -> dict[str, Any]:
    """Who the gateway takes the caller to be, and the groups it saw; answered even to a caller it
    refuses."""
    # Authenticated but not authorized: this is how a refused user learns who the gateway
    # thinks they are and which groups it saw.
    who = get_authenticator().authenticate(authorization(), client_address())
    return {
        "user_id": who.user_id,
        "username": who.username,
        "name": who.name,
        "email": who.email,
        "identity_provider": {"domain": who.idp_domain, "name": who.idp_name},
        "groups": sorted(who.groups),
        "is_admin": who.is_admin,
    }


@route(catalog, "/resource_server/v1/list-endpoints", methods=["GET"])
def list_endpoints() -> dict[str, Any]:
    """FIRST's list of clusters, frameworks and models the caller may use."""
    return views.list_endpoints(Registry.current(), caller())


@route(catalog, "/resource_server/v1/{cluster}/jobs", methods=["GET"])
def cluster_jobs(cluster: str) -> dict[str, Any]:
    """The cluster's running, starting, queued and stopped models, as last polled."""
    return views.jobs(Registry.current(), caller(), cluster)


@route(catalog, "/resource_server/v1/status", methods=["GET"])
def cluster_status() -> dict[str, Any]:
    """Per cluster status, free nodes and model counts (no auth)."""
    return views.status(Registry.current())
