"""The registry file (`load_file`), the registry table (`publish`) and its snapshot (`current`)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from first_core.registry import (
    CLUSTER_KEY,
    Registry,
    RegistryFile,
    RegistryFileError,
    load_file,
    publish,
)
from first_core.tables import RegistryEntry
from tests.support.registry import (
    DIRECT_MODEL,
    EMBEDDER,
    LOCAL_REGISTRY,
    MODEL,
    POLARIS_ENDPOINT,
    REGISTERED_FUNCTIONS,
    SMALL_MODEL,
    publish_local,
)

LLAMA_70B = "meta-llama/Meta-Llama-3.1-70B-Instruct"

EP_SOPHIA = "0c0ffee0-0000-4000-8000-0000000000a1"
EP_SOPHIA_2 = "0c0ffee0-0000-4000-8000-0000000000a2"
INFERENCE = REGISTERED_FUNCTIONS["inference"]

VALID = f"""\
clusters:
  sophia:
    frameworks: [vllm]
    endpoints:
      - framework: vllm
        endpoint_id: {EP_SOPHIA}
        models: [m1]
        functions:
          inference: "{INFERENCE}"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# -- load_file --------------------------------------------------------------------------------
def test_local_registry_file_has_sophia_and_polaris() -> None:
    registry = load_file(LOCAL_REGISTRY, functions=REGISTERED_FUNCTIONS)

    # ... and the direct backend beside them (test_a_direct_backend_in_the_local_registry).
    assert set(registry.clusters) == {"sophia", "polaris", "direct"}
    sophia, polaris = registry.clusters["sophia"], registry.clusters["polaris"]
    assert sophia.frameworks == ["vllm"]
    assert polaris.frameworks == ["vllm"]
    assert [m for e in sophia.endpoints for m in e.models] == [MODEL, LLAMA_70B, EMBEDDER]
    assert [m for e in polaris.endpoints for m in e.models] == [MODEL, SMALL_MODEL]
    # The small model's tight limits are what the rate-limit contract tests run into.
    assert polaris.endpoints[1].limits.requests_per_second_per_user == 2
    assert polaris.endpoints[1].limits.tokens_per_minute_per_user == 300
    assert {e.framework for c in registry.clusters.values() for e in c.endpoints} == {"vllm"}
    assert sophia.endpoints[0].limits.max_tokens == 8192
    assert sophia.endpoints[0].batches is True
    assert polaris.endpoints[0].batches is False


def test_a_minimal_file_loads(tmp_path: Path) -> None:
    registry = load_file(write(tmp_path, VALID))

    assert isinstance(registry, RegistryFile)
    endpoint = registry.clusters["sophia"].endpoints[0]
    assert endpoint.endpoint_id == EP_SOPHIA
    assert endpoint.functions.inference == INFERENCE
    assert endpoint.allowed_groups == []
    assert registry.clusters["sophia"].maintenance is False


@pytest.mark.parametrize(
    ("broken", "field"),
    [
        (
            VALID.replace("    frameworks: [vllm]\n", "    frameworks: [vllm]\n    gpus: 8\n"),
            "gpus",
        ),
        (
            VALID.replace("        models: [m1]\n", "        models: [m1]\n        replicas: 2\n"),
            "replicas",
        ),
        (VALID.replace(f"        endpoint_id: {EP_SOPHIA}\n", ""), "endpoint_id"),
        (VALID.replace(EP_SOPHIA, "local-sophia-vllm"), "not a Globus Compute id"),
        (VALID.replace(INFERENCE, "local:inference"), "inference: 'local:inference' is not"),
        (VALID.replace(EP_SOPHIA, EP_SOPHIA.upper()), f"in lowercase: '{EP_SOPHIA}'"),
        (VALID.replace("models: [m1]", "models: []"), "models"),
        (
            VALID.replace(f'          inference: "{INFERENCE}"\n', "          qstat: q\n"),
            "inference",
        ),
        (VALID.replace("frameworks: [vllm]", "frameworks: []"), "frameworks"),
        ("clusters: {}\n", "clusters"),
    ],
    ids=[
        "unknown-cluster-key",
        "unknown-endpoint-key",
        "missing-endpoint_id",
        "endpoint-id-not-a-uuid",
        "function-id-not-a-uuid",
        "endpoint-id-in-capitals",
        "empty-models",
        "missing-inference-function",
        "empty-frameworks",
        "no-clusters",
    ],
)
def test_bad_file_names_the_file_and_the_field(tmp_path: Path, broken: str, field: str) -> None:
    path = write(tmp_path, broken)

    with pytest.raises(RegistryFileError) as bad:
        load_file(path)

    assert str(path) in str(bad.value)
    assert field in str(bad.value)


@pytest.mark.parametrize("text", ["", "clusters: [unclosed\n", "- just\n- a list\n"])
def test_empty_or_unparsable_file_is_a_registry_file_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(RegistryFileError) as bad:
        load_file(path)

    assert str(path) in str(bad.value)


# -- publish and read back --------------------------------------------------------------------
def test_publish_then_current_round_trips_the_local_registry(aws: None) -> None:
    rows = publish(load_file(LOCAL_REGISTRY, functions=REGISTERED_FUNCTIONS))

    assert rows == 3 + 6  # three cluster rows, one row per (framework, model)
    snapshot = Registry.current()
    assert set(snapshot.clusters) == {"sophia", "polaris", "direct"}
    assert {c.status for c in snapshot.clusters.values()} == {"online"}
    assert snapshot.clusters["sophia"].frameworks == ["vllm"]
    assert sorted((e.cluster, e.framework, e.model) for e in snapshot.endpoints) == [
        ("direct", "vllm", DIRECT_MODEL),
        ("polaris", "vllm", SMALL_MODEL),
        ("polaris", "vllm", MODEL),
        ("sophia", "vllm", EMBEDDER),
        ("sophia", "vllm", MODEL),
        ("sophia", "vllm", LLAMA_70B),
    ]
    assert snapshot.models() == sorted({MODEL, LLAMA_70B, EMBEDDER, SMALL_MODEL, DIRECT_MODEL})
    polaris = next(e for e in snapshot.endpoints if e.cluster == "polaris" and e.model == MODEL)
    assert polaris.endpoint_id == POLARIS_ENDPOINT
    assert polaris.functions.inference == INFERENCE
    assert polaris.limits.max_tokens == 8192
    assert polaris.status == "online"


def test_published_rows_use_the_cluster_and_framework_model_keys(aws: None) -> None:
    publish_local()

    keys = sorted((row.cluster, row.key) for row in RegistryEntry.scan())

    assert keys == sorted(
        [
            ("direct", CLUSTER_KEY),
            ("direct", f"vllm#{DIRECT_MODEL}"),
            ("polaris", CLUSTER_KEY),
            ("polaris", f"vllm#{MODEL}"),
            ("polaris", f"vllm#{SMALL_MODEL}"),
            ("sophia", CLUSTER_KEY),
            ("sophia", f"vllm#{MODEL}"),
            ("sophia", f"vllm#{LLAMA_70B}"),
            ("sophia", f"vllm#{EMBEDDER}"),
        ]
    )


def test_cluster_in_maintenance_is_published_as_maintenance(aws: None, tmp_path: Path) -> None:
    text = VALID.replace(
        "    frameworks: [vllm]\n",
        "    frameworks: [vllm]\n    maintenance: true\n"
        "    allowed_groups: [g1]\n    allowed_domains: [anl.gov]\n",
    )
    publish(load_file(write(tmp_path, text)))

    sophia = Registry.current().clusters["sophia"]

    assert sophia.status == "maintenance"
    assert sophia.allowed_groups == ["g1"]
    assert sophia.allowed_domains == ["anl.gov"]


def test_current_is_cached_until_invalidated(aws: None, tmp_path: Path) -> None:
    publish(load_file(write(tmp_path, VALID)))
    first = Registry.current()
    assert Registry.current() is first

    publish_local()
    assert Registry.current() is first  # within registry_cache_seconds

    Registry.invalidate()
    assert set(Registry.current().clusters) == {"sophia", "polaris", "direct"}


def test_same_model_twice_on_one_cluster_and_framework_is_rejected(tmp_path: Path) -> None:
    second = (
        "      - framework: vllm\n"
        f"        endpoint_id: {EP_SOPHIA_2}\n"
        "        models: [m1]\n"
        "        functions:\n"
        f'          inference: "{INFERENCE}"\n'
    )
    path = write(tmp_path, VALID + second)

    with pytest.raises(RegistryFileError) as bad:
        load_file(path)

    assert "m1" in str(bad.value)


def test_errors_give_the_line_of_the_offending_field(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(
        "clusters:\n"
        "  sophia:\n"
        "    frameworks: [vllm]\n"
        "    endpoints:\n"
        "      - framework: vllm\n"
        "        models: [m1]\n"
        "        functions:\n"
        f'          inference: "{INFERENCE}"\n'
        "        colour: blue\n"
    )
    with pytest.raises(RegistryFileError) as raised:
        load_file(path)
    lines = str(raised.value).splitlines()
    assert f"{path}:5: clusters.sophia.endpoints.0.endpoint_id: Field required" in lines
    assert any(line.startswith(f"{path}:9: clusters.sophia.endpoints.0.colour:") for line in lines)


def test_the_local_registry_needs_the_ids_registered_at_start() -> None:
    """It names no functions: they are the UUIDs the stand-in gives at each start."""
    with pytest.raises(RegistryFileError) as bad:
        load_file(LOCAL_REGISTRY)
    assert "functions: Field required" in str(bad.value)


def test_registered_ids_replace_those_the_file_names(tmp_path: Path) -> None:
    other = {**REGISTERED_FUNCTIONS, "inference": "f0000000-0000-4000-8000-00000000000f"}

    loaded = load_file(write(tmp_path, VALID), functions=other)

    assert loaded.clusters["sophia"].endpoints[0].functions.model_dump() == other


def test_a_bad_id_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace(EP_SOPHIA, "local-sophia-vllm"))
    with pytest.raises(RegistryFileError) as bad:
        load_file(path)
    assert str(bad.value).startswith(f"{path}:6: clusters.sophia.endpoints.0.endpoint_id:")
