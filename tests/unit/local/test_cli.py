"""The operator's command (`first-gateway`, first_local.cli) against the registry table."""

from __future__ import annotations

import pytest

from first_core.registry import CLUSTER_KEY
from first_core.tables import RegistryEntry
from first_local.cli import main


def _rows() -> dict[tuple[str, str], RegistryEntry]:
    return {(r.cluster, r.key): r for r in RegistryEntry.scan(consistent_read=True)}


def test_operator_maintenance_command(
    registry_table: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["registry", "maintenance", "sophia", "on"]) == 0
    assert _rows()[("sophia", CLUSTER_KEY)].status == "maintenance"
    assert _rows()[("sophia", CLUSTER_KEY)].config["maintenance"] is True
    assert main(["registry", "maintenance", "sophia", "off"]) == 0
    assert _rows()[("sophia", CLUSTER_KEY)].status == "online"
    assert main(["registry", "maintenance", "metis", "on"]) == 1
    assert "no cluster 'metis'" in capsys.readouterr().err
