"""The registry file: clusters, their endpoints, models, limits and function ids, as an operator
writes them in YAML (`infra/registry/`). `load_file` validates it, naming the line of every
mistake; `publish` writes it to the registry table, one row per cluster and one per
(framework, model).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from first_core.tables import RegistryEntry

# The row key of a cluster's own row (the others are `{framework}#{model}`).
CLUSTER_KEY = "#cluster"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _compute_id(value: str) -> str:
    """Globus Compute ids are UUIDs, written lowercase: the SDK looks up its own answer by the
    string it was given, and the service sends it back lowercase."""
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"'{value}' is not a Globus Compute id (a UUID)") from None
    if value != canonical:
        raise ValueError(f"write the Globus Compute id in lowercase: '{canonical}'")
    return value


class FunctionIds(_Strict):
    """Globus Compute function ids registered for the endpoint (`compute_funcs.register`)."""

    inference: str
    streaming: str | None = None
    batch: str | None = None
    qstat: str | None = None


class Limits(_Strict):
    """Per-model limits: max_tokens, the per-user rate limits and the model's tokens per minute."""

    max_tokens: int | None = None
    tokens_per_minute_per_user: int | None = None
    tokens_per_minute: int | None = None
    requests_per_second_per_user: float | None = None


class EndpointConfig(_Strict):
    """One Globus Compute endpoint in the registry YAML: the models it serves, its function ids,
    limits and access rules."""

    framework: str
    models: list[str] = Field(min_length=1)
    endpoint_id: str
    functions: FunctionIds
    limits: Limits = Limits()
    allowed_groups: list[str] = Field(default_factory=list)
    # Identity-provider domains whose users may use these models (empty: any the gateway allows).
    allowed_domains: list[str] = Field(default_factory=list)
    # Whether these models take batches (first_core.batches), run by `functions.batch` on
    # `batch_endpoint_id` (a cluster's batch queue), or on `endpoint_id` when it names none.
    batches: bool = False
    batch_endpoint_id: str | None = None

    @field_validator("endpoint_id", "batch_endpoint_id")
    @classmethod
    def _endpoint_ids_are_uuids(cls, value: str | None) -> str | None:
        return None if value is None else _compute_id(value)

    @field_validator("functions")
    @classmethod
    def _function_ids_are_uuids(cls, value: FunctionIds) -> FunctionIds:
        for name, function_id in value.model_dump(exclude_none=True).items():
            try:
                _compute_id(function_id)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        return value

    @model_validator(mode="after")
    def _batches_need_the_function(self) -> EndpointConfig:
        if self.batches and not self.functions.batch:
            raise ValueError("batches: true needs a functions.batch id")
        return self


class ClusterConfig(_Strict):
    """One cluster in the registry YAML: its frameworks, access rules and endpoints."""

    frameworks: list[str] = Field(min_length=1)
    allowed_groups: list[str] = Field(default_factory=list)
    allowed_domains: list[str] = Field(default_factory=list)
    maintenance: bool = False
    endpoints: list[EndpointConfig] = Field(min_length=1)


class RegistryFile(_Strict):
    """The registry YAML: clusters and their endpoints, validated."""

    clusters: dict[str, ClusterConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_endpoint_per_model(self) -> RegistryFile:
        """Each (cluster, framework, model) is one registry row, so it may be served once."""
        for name, cluster in self.clusters.items():
            seen: set[tuple[str, str]] = set()
            for endpoint in cluster.endpoints:
                if endpoint.framework not in cluster.frameworks:
                    raise ValueError(
                        f"clusters.{name}: endpoint {endpoint.endpoint_id} uses framework "
                        f"'{endpoint.framework}', not among the cluster's {cluster.frameworks}"
                    )
                for model in endpoint.models:
                    if (endpoint.framework, model) in seen:
                        raise ValueError(
                            f"clusters.{name}: model '{model}' is listed twice for framework "
                            f"'{endpoint.framework}'"
                        )
                    seen.add((endpoint.framework, model))
        return self


class RegistryFileError(ValueError):
    """The registry YAML is invalid; the message names each problem with its line."""

    pass


def load_file(path: str | Path, functions: Mapping[str, str] | None = None) -> RegistryFile:
    """The registry file, validated; errors name the file, the line and the field.

    `functions`: ids just registered (name → id), put on every endpoint over what the file says,
    as `compute_funcs.register --write` would write them (the local stack registers at start).
    """
    text = Path(path).read_text()
    try:
        document = yaml.safe_load(text)
        if functions:
            put_functions(document, functions)
        return RegistryFile.model_validate(document)
    except yaml.YAMLError as error:
        raise RegistryFileError(f"{path}: {error}") from None
    except ValidationError as error:
        root = yaml.compose(text)
        problems = [
            f"{path}:{_line_of(root, problem['loc'])}: {'.'.join(map(str, problem['loc']))}: "
            f"{problem['msg']}"
            for problem in error.errors(include_url=False)
        ]
        raise RegistryFileError("\n".join(problems)) from None


def put_functions(
    document: Any, functions: Mapping[str, str], clusters: Collection[str] = ()
) -> int:
    """Put the function ids on every endpoint of the named clusters (all if none) of a registry
    document as YAML reads it; the number of endpoints changed. A malformed document is left
    for validation to name."""
    changed = 0
    named = document.get("clusters") if isinstance(document, dict) else None
    for name, cluster in (named or {}).items():
        if clusters and name not in clusters:
            continue
        for endpoint in (cluster or {}).get("endpoints") or []:
            if isinstance(endpoint, dict):
                endpoint["functions"] = {**(endpoint.get("functions") or {}), **functions}
                changed += 1
    return changed


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int:
    """The 1-based line of the deepest part of `loc` that exists in the YAML document."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == str(part)), None)
            if child is None:  # an unknown key: point at the key itself
                child = next((k for k, _ in node.value if k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            child = node.value[part] if part < len(node.value) else None
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line


def publish(registry: RegistryFile) -> int:
    """Write the registry to the table; returns the number of rows written."""
    now = time.time()
    rows = 0
    with RegistryEntry.batch_write() as batch:
        for name, cluster in registry.clusters.items():
            status = "maintenance" if cluster.maintenance else "online"
            config = cluster.model_dump(exclude={"endpoints"})
            batch.save(
                RegistryEntry(name, CLUSTER_KEY, config=config, status=status, updated_at=now)
            )
            rows += 1
            for endpoint in cluster.endpoints:
                for model in endpoint.models:
                    batch.save(
                        RegistryEntry(
                            name,
                            f"{endpoint.framework}#{model}",
                            config=endpoint.model_dump(),
                            status="online",
                            updated_at=now,
                        )
                    )
                    rows += 1
    return rows
