"""Unit-test fixtures: in-process moto for DynamoDB and S3, and no state shared between tests.

`tests/conftest.py` has already set the environment (fake AWS credentials, table prefix,
callback secret) before anything imported `first_core`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.dynamodb.models import DynamoDBBackend

import first_core.auth
import first_core.compute
import first_core.storage
import first_core.tables
from first_core.compute import SERVICE_URL_VARIABLE, GlobusComputeBackend
from first_core.registry import Registry
from first_core.settings import get_settings
from first_local.compute_standin import ApiLimit, ComputeService, Faults
from first_local.compute_standin import create_app as create_compute_app
from first_local.globus_standin import DEV_CLIENT_ID, DEV_CLIENT_SECRET
from first_local.globus_standin import create_app as create_auth_app
from first_local.provision import TEMPLATE, create_bucket, create_tables_from_template
from tests.support.asgi import serve
from tests.support.compute import TEST_ENDPOINT_ID, ComputeStandIn, FakeBackend
from tests.support.registry import publish_local


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In-memory state of the core modules must not leak from one test into the next."""
    Registry.invalidate()
    # No Globus Compute API budget unless a test is about it (core/compute/test_budget.py).
    monkeypatch.setattr(get_settings(), "compute_api_calls_per_window", 0)
    monkeypatch.setattr(first_core.auth, "_authenticator", None)
    # The SDK must talk to the real Globus URLs, which `responses` intercepts in the tests.
    for service in ("AUTH", "GROUPS", "COMPUTE"):
        monkeypatch.delenv(f"GLOBUS_SDK_SERVICE_URL_{service}", raising=False)
    monkeypatch.delenv("GLOBUS_SDK_ENVIRONMENT", raising=False)
    yield
    Registry.invalidate()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every table and the results bucket, in a moto backend that lives for one test."""
    with mock_aws():
        # Clients built in an earlier test belong to an earlier (discarded) moto backend.
        first_core.storage.s3.cache_clear()
        monkeypatch.setattr(first_core.tables, "_connection", None)
        settings = get_settings()
        # The tables and bucket exactly as template.yaml declares them.
        dynamodb = boto3.client("dynamodb", region_name=settings.aws_region)
        create_tables_from_template(dynamodb, TEMPLATE, settings.table_prefix)
        create_bucket(first_core.storage.s3(), TEMPLATE, settings.results_bucket)
        yield
        first_core.storage.s3.cache_clear()


@pytest.fixture
def authenticator() -> first_core.auth.Authenticator:
    """A cold instance (empty memory cache), never the module singleton."""
    return first_core.auth.Authenticator()


# -- Globus Compute: the stand-ins in this process, reached by the real SDK ---------------------
@pytest.fixture(scope="session")
def compute_standins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComputeStandIn]:
    """One endpoint with two real engine workers, for the whole session (workers start in ~1 s)."""
    service = ComputeService(limit=ApiLimit(0, 0))
    endpoint = service.add_endpoint(
        TEST_ENDPOINT_ID, "test", 2, {}, tmp_path_factory.mktemp("compute-endpoint")
    )
    endpoint.start()
    endpoint.warm_up(service.warm_task)
    try:
        with serve(create_auth_app()) as auth, serve(create_compute_app(service)) as compute:
            yield ComputeStandIn(service, endpoint, f"{auth}/auth/", compute)
    finally:
        endpoint.shutdown()


@pytest.fixture
def globus_compute(
    compute_standins: ComputeStandIn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[ComputeStandIn]:
    """The environment the local stack gives the gateway: the real `globus-compute-sdk` Client
    reaches the stand-ins with the gateway's client credentials. The service is put back as it
    was (endpoint online, no faults, no limit) after each test."""
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", compute_standins.auth_url)
    monkeypatch.setenv(SERVICE_URL_VARIABLE, compute_standins.compute_url)
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_ID", DEV_CLIENT_ID)
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_SECRET", DEV_CLIENT_SECRET)
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(tmp_path / "globus_compute"))
    yield compute_standins
    compute_standins.service.faults = Faults()
    compute_standins.service.set_limit(ApiLimit(0, 0))
    if not compute_standins.endpoint.online:
        compute_standins.endpoint.start()


@pytest.fixture
def backend(globus_compute: ComputeStandIn) -> GlobusComputeBackend:
    """The gateway's real backend, through the real SDK, against the stand-ins (the batch tests
    override it with a `FakeBackend`: tests/unit/core/batches/conftest.py)."""
    return GlobusComputeBackend()


@pytest.fixture
def fake_backend(monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    """A scripted backend as the process's Globus Compute backend (what `get_backend` gives)."""
    backend = FakeBackend()
    monkeypatch.setattr(first_core.compute, "_backend", backend)
    return backend


@pytest.fixture
def atomic_moto(aws: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """DynamoDB applies a write's condition and update atomically per item; moto's in-process
    backend checks and writes without a lock. One lock around it makes it behave as DynamoDB
    does (the local stack's moto server does the same, first_local.moto_server)."""
    lock = threading.Lock()
    original = DynamoDBBackend.update_item

    def update_item(self: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            return original(self, *args, **kwargs)

    monkeypatch.setattr(DynamoDBBackend, "update_item", update_item)
    yield


@pytest.fixture
def registry_table(aws: None) -> None:
    """The local registry (infra/registry/local.yaml) in the registry table."""
    publish_local()
