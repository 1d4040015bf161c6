"""Registering the compute functions: the exact calls made to Globus Compute, and the ids
written into a registry file that the gateway then loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from compute_funcs import FUNCTIONS, register
from first_core.registry import load_file
from tests.conftest import PROJECT_ROOT


class FakeClient:
    """Stands in for `globus_compute_sdk.Client`: records calls, hands out ids."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def register_function(self, function: Any, **options: Any) -> str:
        self.calls.append((function, options))
        return f"00000000-0000-4000-8000-{len(self.calls):012d}"


def test_every_function_is_registered_once_with_a_description() -> None:
    client = FakeClient()
    ids = register.register_all(client)
    assert [call[0] for call in client.calls] == list(FUNCTIONS.values())
    assert all(call[1]["description"].startswith("FIRST gateway: ") for call in client.calls)
    assert set(ids) == set(FUNCTIONS) and len(set(ids.values())) == len(FUNCTIONS)


def test_the_client_ships_functions_as_source(monkeypatch: pytest.MonkeyPatch) -> None:
    import globus_compute_sdk
    from globus_compute_sdk.serialize import DillCodeSource

    made: dict[str, Any] = {}

    def fake_client(**options: Any) -> FakeClient:
        made.update(options)
        return FakeClient()

    monkeypatch.setattr(globus_compute_sdk, "Client", fake_client)
    register.make_client()
    assert isinstance(made["code_serialization_strategy"], DillCodeSource)


def test_ids_are_written_into_the_registry_and_it_still_loads(tmp_path: Path) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text((PROJECT_ROOT / "infra" / "registry" / "local.yaml").read_text())
    client = FakeClient()
    assert register.main(
        ["--registry", str(registry), "--write", "--cluster", "polaris"], client=client
    ) == 0
    loaded = load_file(registry)
    polaris = loaded.clusters["polaris"].endpoints[0].functions
    sophia = loaded.clusters["sophia"].endpoints[0].functions
    assert polaris.inference.startswith("00000000-") and polaris.streaming
    assert sophia.inference == "local:inference"  # only the named cluster changed
    printed = yaml.safe_load(registry.read_text())
    assert set(printed["clusters"]) == {"sophia", "polaris"}
