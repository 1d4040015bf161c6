"""The registry: which clusters exist, which models their endpoints serve, and their status.

An operator describes it in YAML under `infra/registry/`; `load_file` validates it and
`publish` writes it to the registry table, one row per cluster and one per (framework, model).
Gateway functions read the table through `Registry.current()`, cached for a few seconds.

- `config`: the YAML file (`load_file`, `publish`);
- `snapshot`: the table as the gateway reads it (`Registry.current()`, `Endpoint`, `Cluster`);
- `routing`: which endpoint serves a request, and why;
- `health`: the poller that writes each endpoint's and model's state;
- `views`: the registry as the status routes show it.
"""

from first_core.registry.config import (
    CLUSTER_KEY,
    ClusterConfig,
    DirectBackend,
    EndpointConfig,
    FunctionIds,
    Limits,
    RegistryFile,
    RegistryFileError,
    load_file,
    publish,
)
from first_core.registry.snapshot import Cluster, Endpoint, Registry

__all__ = [
    "CLUSTER_KEY",
    "Cluster",
    "ClusterConfig",
    "DirectBackend",
    "Endpoint",
    "EndpointConfig",
    "FunctionIds",
    "Limits",
    "Registry",
    "RegistryFile",
    "RegistryFileError",
    "load_file",
    "publish",
]
