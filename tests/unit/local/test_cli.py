"""The operator's command (`first-gateway`, first_local.cli) against the registry table."""

from __future__ import annotations

import os

import pytest

from first_core.registry import CLUSTER_KEY
from first_core.tables import RegistryEntry
from first_local.cli import main


def _rows() -> dict[tuple[str, str], RegistryEntry]:
    return {(r.cluster, r.key): r for r in RegistryEntry.scan(consistent_read=True)}


def test_operator_maintenance_command(
    registry_table: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # In process, first_core's settings are already read (in-process moto, table prefix
    # first-local-): `--aws --stage local` names those tables; what the target sets in the
    # environment is undone after the test.
    for name in ("FIRST_STAGE", "FIRST_AWS_REGION", "FIRST_TABLE_PREFIX"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    aws = ["--aws", "--stage", "local", "--region", "us-east-1"]
    assert main(["registry", "maintenance", "sophia", "on", *aws]) == 0
    assert "acting on AWS stage local (us-east-1)" in capsys.readouterr().err
    assert _rows()[("sophia", CLUSTER_KEY)].status == "maintenance"
    assert _rows()[("sophia", CLUSTER_KEY)].config["maintenance"] is True
    assert main(["registry", "maintenance", "sophia", "off", *aws]) == 0
    assert _rows()[("sophia", CLUSTER_KEY)].status == "online"
    assert main(["registry", "maintenance", "metis", "on", *aws]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        "first-gateway: no cluster 'metis' in the registry (clusters: direct, polaris, sophia)"
    )
