"""What there is and who you are: health, the models you may use, the clusters' state
(first_core.registry)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

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
    return views.models(_framework_registry(cluster, framework), who, cluster, framework)


# Model ids hold a slash (`meta-llama/Meta-Llama-3-8B-Instruct`): the openai SDK sends it as
# `%2F` (one segment, decoded here), older SDKs and curl as a second segment. Chalice's path
# parameters are single segments, so both shapes are routes.
@route(catalog, "/v1/models/{model_id}", methods=["GET"])
def retrieve_model(model_id: str) -> dict[str, Any]:
    """One model the caller may use, as in `GET /v1/models` (404 model_not_found otherwise)."""
    return views.model(Registry.current(), caller(), unquote(model_id))


@route(catalog, "/v1/models/{model_id}/{model_name}", methods=["GET"])
def retrieve_owned_model(model_id: str, model_name: str) -> dict[str, Any]:
    """`GET /v1/models/{id}` for an id with a slash, sent unescaped (`model_id` is its owner;
    API Gateway wants one variable name per path level)."""
    full = f"{unquote(model_id)}/{unquote(model_name)}"
    return views.model(Registry.current(), caller(), full)


@route(catalog, "/resource_server/v1/{cluster}/{framework}/v1/models/{model_id}", methods=["GET"])
def retrieve_cluster_model(cluster: str, framework: str, model_id: str) -> dict[str, Any]:
    """One model of a cluster's framework that the caller may use."""
    who = caller()
    registry = _framework_registry(cluster, framework)
    return views.model(registry, who, unquote(model_id), cluster, framework)


@route(
    catalog,
    "/resource_server/v1/{cluster}/{framework}/v1/models/{model_id}/{model_name}",
    methods=["GET"],
)
def retrieve_cluster_owned_model(
    cluster: str, framework: str, model_id: str, model_name: str
) -> dict[str, Any]:
    """The cluster route for an id with a slash, sent unescaped."""
    who = caller()
    registry = _framework_registry(cluster, framework)
    full = f"{unquote(model_id)}/{unquote(model_name)}"
    return views.model(registry, who, full, cluster, framework)


def _framework_registry(cluster: str, framework: str) -> Registry:
    """The registry, once the cluster is known to serve the framework (404 otherwise)."""
    registry = Registry.current()
    known = registry.clusters.get(cluster)
    if known is None or framework not in known.frameworks:
        raise NotFoundError(f"No framework '{framework}' on cluster '{cluster}'.", param="cluster")
    return registry


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
