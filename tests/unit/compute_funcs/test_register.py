"""Registering the compute functions with Globus Compute through the real SDK (against the
stand-in), and the ids written into a registry file that the gateway then loads."""

from __future__ import annotations

from pathlib import Path

import yaml

from compute_funcs import FUNCTIONS, register
from first_core.registry import load_file
from tests.support.compute import ComputeStandIn
from tests.support.registry import LOCAL_REGISTRY


def test_every_function_is_registered_once_as_source_with_a_description(
    globus_compute: ComputeStandIn,
) -> None:
    ids = register.register_all(register.make_client())

    assert set(ids) == set(FUNCTIONS) and len(set(ids.values())) == len(FUNCTIONS)
    for name, function_id in ids.items():
        stored = globus_compute.service.functions[function_id]
        assert stored["function_name"] == FUNCTIONS[name].__name__
        assert stored["description"] == f"FIRST gateway: {name}"
        # DillCodeSource ("04"): the endpoints have not got this project to import it from.
        assert stored["function_code"].split("\n", 2)[1] == "04"
        assert stored["metadata"]["serde_identifier"] == "04"


def test_ids_are_written_into_the_registry_and_it_loads(
    globus_compute: ComputeStandIn, tmp_path: Path
) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text(LOCAL_REGISTRY.read_text())

    assert register.main(["--registry", str(registry), "--write"]) == 0

    loaded = load_file(registry)
    for cluster in loaded.clusters.values():
        for endpoint in cluster.endpoints:
            if endpoint.functions is None:  # the direct backend: no Globus Compute functions
                assert endpoint.backend == "direct"
                continue
            assert endpoint.functions.inference in globus_compute.service.functions
            assert endpoint.functions.streaming in globus_compute.service.functions


def test_only_the_named_clusters_are_changed(
    globus_compute: ComputeStandIn, tmp_path: Path
) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text(LOCAL_REGISTRY.read_text())

    register.main(["--registry", str(registry), "--write", "--cluster", "polaris"])

    written = yaml.safe_load(registry.read_text())["clusters"]
    assert all("functions" in e for e in written["polaris"]["endpoints"])
    assert all("functions" not in e for e in written["sophia"]["endpoints"])


def test_the_local_registry_takes_the_ids_the_stack_registered(
    globus_compute: ComputeStandIn,
) -> None:
    """The local stack registers at start and loads its registry with the ids it got."""
    ids = register.register_all(register.make_client())

    loaded = load_file(LOCAL_REGISTRY, functions=ids)

    sophia = loaded.clusters["sophia"].endpoints[0]
    assert sophia.functions.model_dump() == ids
    assert sophia.batch_endpoint_id is not None
