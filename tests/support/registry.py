"""Registry entries: the local registry's endpoints, function ids as the local stack's
registration gives them, and one endpoint for tests below routing."""

from __future__ import annotations

from first_core.registry import Endpoint, FunctionIds, Limits, load_file, publish
from tests.conftest import PROJECT_ROOT

LOCAL_REGISTRY = PROJECT_ROOT / "infra" / "registry" / "local.yaml"
MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
EMBEDDER = "Salesforce/SFR-Embedding-Mistral"
SMALL_MODEL = "meta-llama/Llama-3.2-1B-Instruct"  # served by polaris only
DIRECT_MODEL = "openai/gpt-oss-20b"  # the local direct backend's (cluster `direct`)

# infra/registry/local.yaml's endpoints, and function ids to load it with.
SOPHIA_ENDPOINT = "f5ddf440-2b40-56af-bcff-c720b49fb2e4"
SOPHIA_BATCH_ENDPOINT = "39debb4e-7ca7-5630-b1bb-e03d7502c79f"
POLARIS_ENDPOINT = "54085316-2839-58e5-99e6-87ab7b0ca4ba"
REGISTERED_FUNCTIONS = {
    "inference": "f0000000-0000-4000-8000-000000000001",
    "streaming": "f0000000-0000-4000-8000-000000000002",
    "qstat": "f0000000-0000-4000-8000-000000000003",
    "batch": "f0000000-0000-4000-8000-000000000004",
}

# sophia's 8B model, as the router hands it to the layers below.
ENDPOINT = Endpoint(
    cluster="sophia",
    framework="vllm",
    model=MODEL,
    endpoint_id=SOPHIA_ENDPOINT,
    functions=FunctionIds(inference=REGISTERED_FUNCTIONS["inference"]),
    limits=Limits(),
    allowed_groups=[],
    status="online",
)


def publish_local() -> None:
    """The local registry in the registry table (in-process moto), as the stack publishes it."""
    publish(load_file(LOCAL_REGISTRY, functions=REGISTERED_FUNCTIONS))
