"""Unit-test fixtures: in-process moto for DynamoDB and S3, and no state shared between tests.

`tests/conftest.py` has already set the environment (fake AWS credentials, table prefix,
callback secret) before anything imported `first_core`.
"""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
from moto import mock_aws

import first_core.auth
import first_core.storage
import first_core.tables
from first_core.registry import Registry
from first_core.settings import get_settings
from first_local.provision import TEMPLATE, create_bucket, create_tables_from_template


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In-memory state of the core modules must not leak from one test into the next."""
    Registry.invalidate()
    monkeypatch.setattr(first_core.auth, "_authenticator", None)
    # The SDK must talk to the real Globus URLs, which `responses` intercepts in the tests.
    for service in ("AUTH", "GROUPS"):
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
