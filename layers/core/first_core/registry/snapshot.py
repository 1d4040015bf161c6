"""The registry as the gateway reads it: a snapshot of the registry table (`Registry.current()`,
cached for `registry_cache_seconds` per function instance), its clusters and the endpoint that
serves each model on each.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from first_core.registry.config import (
    CLUSTER_KEY,
    DirectBackend,
    FunctionIds,
    Limits,
    direct_backend,
)
from first_core.settings import get_settings
from first_core.tables import iter_registry

# A direct backend's functions: none (its requests never reach Globus Compute).
NO_FUNCTIONS = {"inference": ""}


class Endpoint(BaseModel):
    """One model served by one cluster's endpoint, as the router sees it."""

    model_config = ConfigDict(frozen=True)

    cluster: str
    framework: str
    model: str
    endpoint_id: str
    functions: FunctionIds
    limits: Limits
    allowed_groups: list[str]
    status: str
    allowed_domains: list[str] = Field(default_factory=list)
    batches: bool = False
    batch_endpoint_id: str | None = None
    # A direct backend (first_core.inference.direct) rather than a Globus Compute endpoint: its
    # `endpoint_id` is then `direct:{base_url}` and it has no functions.
    direct: DirectBackend | None = None

    @property
    def batch_runs_on(self) -> str:
        """The compute endpoint that runs this model's batches."""
        return self.batch_endpoint_id or self.endpoint_id


class Cluster(BaseModel):
    """A cluster as routing sees it: its frameworks, access rules, status and free nodes."""

    model_config = ConfigDict(frozen=True)

    name: str
    frameworks: list[str]
    allowed_groups: list[str]
    allowed_domains: list[str]
    status: str
    free_nodes: int | None = None  # as the health poller last saw (None: unknown)


def _free_nodes(row: Any) -> int | None:
    free = getattr(row, "free_nodes", None)
    return int(free) if free is not None else None


class Registry:
    """A snapshot of the registry table."""

    _cache: tuple[float, Registry] | None = None
    _lock = threading.Lock()

    def __init__(self, clusters: dict[str, Cluster], endpoints: list[Endpoint]) -> None:
        self.clusters = clusters
        self.endpoints = endpoints

    @classmethod
    def current(cls) -> Registry:
        now = time.monotonic()
        cached = cls._cache
        if cached is not None and cached[0] > now:
            return cached[1]
        with cls._lock:
            snapshot = cls.from_rows(iter_registry())
            cls._cache = (now + get_settings().registry_cache_seconds, snapshot)
        return snapshot

    @classmethod
    def invalidate(cls) -> None:
        cls._cache = None

    @classmethod
    def from_rows(cls, rows: Any) -> Registry:
        clusters: dict[str, Cluster] = {}
        endpoints: list[Endpoint] = []
        for row in rows:
            if row.key == CLUSTER_KEY:
                clusters[row.cluster] = Cluster(
                    name=row.cluster,
                    status=row.status,
                    free_nodes=_free_nodes(row),
                    **{
                        k: row.config.get(k, [])
                        for k in ("frameworks", "allowed_groups", "allowed_domains")
                    },
                )
            else:
                framework, _, model = row.key.partition("#")
                config = row.config
                direct = direct_backend(config, model)
                endpoints.append(
                    Endpoint(
                        cluster=row.cluster,
                        framework=framework,
                        model=model,
                        endpoint_id=config.get("endpoint_id") or f"direct:{config['base_url']}",
                        functions=FunctionIds(**(config.get("functions") or NO_FUNCTIONS)),
                        direct=direct,
                        limits=Limits(**config.get("limits", {})),
                        allowed_groups=config.get("allowed_groups", []),
                        allowed_domains=config.get("allowed_domains", []),
                        status=row.status,
                        batches=bool(config.get("batches", False)),
                        batch_endpoint_id=config.get("batch_endpoint_id"),
                    )
                )
        endpoints.sort(key=lambda e: (e.cluster, e.framework, e.model))
        return cls(clusters, endpoints)

    def cluster(self, name: str) -> Cluster:
        """The named cluster, or the 404 that names the known ones."""
        known = self.clusters.get(name)
        if known is None:
            from first_core.errors import NotFoundError

            raise NotFoundError(
                f"Cluster '{name}' does not exist. Known clusters: "
                f"{', '.join(sorted(self.clusters))}.",
                param="cluster",
                code="cluster_not_found",
            )
        return known

    def endpoint(self, cluster: str, framework: str, model: str) -> Endpoint | None:
        """The endpoint that serves `model` with `framework` on `cluster`, if the registry still
        has it (a request or batch records these three)."""
        for endpoint in self.endpoints:
            if (endpoint.cluster, endpoint.framework, endpoint.model) == (
                cluster,
                framework,
                model,
            ):
                return endpoint
        return None

    def models(self) -> list[str]:
        return sorted({e.model for e in self.endpoints})
