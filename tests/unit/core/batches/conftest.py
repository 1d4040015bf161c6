"""The batch tests' compute backend: a `FakeBackend` the lifecycle submits to, on the batch
registry (`tests.support.batches.publish_batch_registry`)."""

from __future__ import annotations

import pytest

import first_core.batches.lifecycle
from tests.support.batches import publish_batch_registry
from tests.support.compute import FakeBackend


@pytest.fixture
def backend(aws: None, monkeypatch: pytest.MonkeyPatch) -> FakeBackend:
    fake = FakeBackend()
    monkeypatch.setattr(first_core.batches.lifecycle, "get_backend", lambda: fake)
    publish_batch_registry()
    return fake
