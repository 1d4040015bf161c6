"""The registry file: clusters, their endpoints, models, limits and function ids, as an operator
writes them in YAML (`infra/registry/`). `load_file` validates it, naming the line of every
mistake; `publish` writes it to the registry table, one row per cluster and one per
(framework, model).

An endpoint is a Globus Compute endpoint (`backend: globus-compute`, the default) or a direct
backend (`backend: direct`): an OpenAI-compatible HTTP API at `base_url` (a vLLM server, a
provider) that the proxy calls itself (first_core.inference.direct).

Long because: both kinds of endpoint are validated here, each mistake named with its line.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

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


# The framework a direct endpoint is reached under on FIRST's cluster path
# (`/resource_server/v1/{cluster}/vllm/v1/...`) when its entry names none.
DIRECT_FRAMEWORK = "vllm"
# `${NAME}` (or `${NAME:-default}`) in a direct endpoint's URLs: the value of that environment
# variable where the registry is loaded (the local stack's mock, a stage's own host).
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: str) -> str:
    def variable(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ValueError(f"the environment variable {name} (in '{value}') is not set")
        return default

    return _VARIABLE.sub(variable, value)


class EndpointConfig(_Strict):
    """One endpoint in the registry YAML: the models it serves, where they run (a Globus Compute
    endpoint and its function ids, or a direct backend's URL and key), limits and access rules."""

    backend: Literal["globus-compute", "direct"] = "globus-compute"
    # Required for a Globus Compute endpoint; a direct one is reached under DIRECT_FRAMEWORK.
    framework: str = ""
    models: list[str] = Field(min_length=1)
    endpoint_id: str | None = None
    functions: FunctionIds | None = None
    # A direct backend: its OpenAI-compatible base URL (`.../v1`), the upstream's own name of a
    # model where it differs from the gateway's (gateway name -> upstream name), the seconds
    # the gateway waits for it (to connect, and for each part of its answer), its key (from an
    # environment variable, locally, or a Secrets Manager secret, on AWS; neither: no key) and
    # the URL the health poller reads (default `{base_url}/models`).
    base_url: str | None = None
    upstream_names: dict[str, str] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0)
    api_key_env: str | None = None
    api_key_secret: str | None = None
    status_url: str | None = None
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
    def _function_ids_are_uuids(cls, value: FunctionIds | None) -> FunctionIds | None:
        for name, function_id in (value.model_dump(exclude_none=True) if value else {}).items():
            try:
                _compute_id(function_id)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        return value

    @field_validator("base_url", "status_url")
    @classmethod
    def _urls_are_http(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = _expand(value).rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"'{url}' is not an http(s) URL")
        return url

    @model_validator(mode="wrap")
    @classmethod
    def _fields_its_backend_needs(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        """A direct backend's default framework; a Globus Compute endpoint's required fields,
        each missing one named as pydantic names a missing field (with its line)."""
        missing: list[InitErrorDetails] = []
        if isinstance(data, dict) and data.get("backend") == "direct":
            data = {"framework": DIRECT_FRAMEWORK, **data}
        elif isinstance(data, dict):
            missing = [
                InitErrorDetails(type="missing", loc=(name,), input=data)
                for name in ("framework", "endpoint_id", "functions")
                if name not in data
            ]
        try:
            validated = handler(data)
        except ValidationError as error:
            found = [
                InitErrorDetails(
                    type=e["type"], loc=e["loc"], input=e["input"], ctx=e.get("ctx", {})
                )
                for e in error.errors(include_url=False)
            ]
            raise ValidationError.from_exception_data(cls.__name__, found + missing) from None
        if missing:
            raise ValidationError.from_exception_data(cls.__name__, missing)
        return validated

    @model_validator(mode="after")
    def _fields_of_its_backend(self) -> EndpointConfig:
        if self.backend == "direct":
            compute_only = ("endpoint_id", "functions", "batch_endpoint_id")
            given = [name for name in compute_only if getattr(self, name) is not None]
            if given:
                raise ValueError(f"a direct backend takes no {', '.join(given)}")
            if self.base_url is None:
                raise ValueError("backend: direct needs a base_url")
            if self.api_key_env and self.api_key_secret:
                raise ValueError("name the key once: api_key_env or api_key_secret")
            unknown = sorted(set(self.upstream_names) - set(self.models))
            if unknown:
                raise ValueError(f"upstream_names names models not served here: {unknown}")
            return self
        direct_only = (
            "base_url", "timeout", "api_key_env", "api_key_secret", "status_url"
        )
        given = [name for name in direct_only if getattr(self, name) is not None]
        if self.upstream_names:
            given.append("upstream_names")
        if given:
            raise ValueError(f"only a direct backend takes {', '.join(given)}")
        if not self.framework:
            raise ValueError("a Globus Compute endpoint needs a framework")
        if self.batches and not (self.functions and self.functions.batch):
            raise ValueError("batches: true needs a functions.batch id")
        return self

    @property
    def direct(self) -> bool:
        return self.backend == "direct"


class DirectBackend(_Strict):
    """How the proxy reaches one model of a direct backend (as the registry snapshot holds it):
    the URL, the model's upstream name, the wait, where its key is, the status URL."""

    base_url: str
    upstream_model: str
    timeout: float | None = None
    api_key_env: str | None = None
    api_key_secret: str | None = None
    status_url: str | None = None

    @property
    def probe_url(self) -> str:
        return self.status_url or f"{self.base_url}/models"


def direct_backend(config: Mapping[str, Any], model: str) -> DirectBackend | None:
    """A registry row's direct backend for `model` (None for a Globus Compute endpoint)."""
    if config.get("backend") != "direct":
        return None
    return DirectBackend(
        base_url=config["base_url"],
        upstream_model=(config.get("upstream_names") or {}).get(model, model),
        timeout=config.get("timeout"),
        api_key_env=config.get("api_key_env"),
        api_key_secret=config.get("api_key_secret"),
        status_url=config.get("status_url"),
    )


class ClusterConfig(_Strict):
    """One cluster in the registry YAML: its frameworks, access rules and endpoints. Without
    `frameworks`, those its endpoints name (a cluster of direct backends needs none)."""

    frameworks: list[str] = Field(min_length=1)
    allowed_groups: list[str] = Field(default_factory=list)
    allowed_domains: list[str] = Field(default_factory=list)
    maintenance: bool = False
    endpoints: list[EndpointConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _frameworks_of_its_endpoints(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "frameworks" in data:
            return data
        used = []
        for endpoint in data.get("endpoints") or []:
            if isinstance(endpoint, dict):
                default = DIRECT_FRAMEWORK if endpoint.get("backend") == "direct" else None
                used.append(endpoint.get("framework") or default)
        return {**data, "frameworks": [f for f in dict.fromkeys(used) if isinstance(f, str)]}


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
                        f"clusters.{name}: endpoint {endpoint.endpoint_id or endpoint.base_url} "
                        f"uses framework "
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
            # A direct backend runs no Globus Compute functions.
            if isinstance(endpoint, dict) and endpoint.get("backend") != "direct":
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
