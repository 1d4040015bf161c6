"""`GlobusComputeBackend` against a fake `globus_compute_sdk.Client`: the exact calls it makes."""

from __future__ import annotations

from typing import Any

import globus_compute_sdk
import pytest

from first_core.compute import GlobusComputeBackend, TaskState
from first_core.errors import ServiceUnavailableError

ENDPOINT = "0f1e2d3c-0000-4000-8000-000000000001"
FUNCTION = "9a8b7c6d-0000-4000-8000-000000000002"


class FakeClient:
    """Records every call; answers what the test put in `tasks` / `endpoints`."""

    instances: list[FakeClient] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.init = (args, kwargs)
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.tasks: dict[str, dict[str, Any]] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.fail_run: Exception | None = None
        FakeClient.instances.append(self)

    def run(self, *args: Any, **kwargs: Any) -> str:
        self.calls.append(("run", args, kwargs))
        if self.fail_run is not None:
            raise self.fail_run
        return "task-1"

    def get_task(self, task_id: str) -> dict[str, Any]:
        self.calls.append(("get_task", (task_id,), {}))
        return self.tasks[task_id]

    def get_endpoint_status(self, endpoint_id: str) -> dict[str, Any]:
        self.calls.append(("get_endpoint_status", (endpoint_id,), {}))
        if endpoint_id not in self.endpoints:
            raise RuntimeError("404 endpoint not found")
        return self.endpoints[endpoint_id]


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> tuple[GlobusComputeBackend, FakeClient]:
    FakeClient.instances.clear()
    monkeypatch.setattr(globus_compute_sdk, "Client", FakeClient)
    backend = GlobusComputeBackend()
    [fake] = FakeClient.instances
    return backend, fake


def test_one_client_made_with_no_arguments(client: tuple[GlobusComputeBackend, FakeClient]) -> None:
    _, fake = client
    # Credentials come from GLOBUS_COMPUTE_CLIENT_ID/SECRET in the environment, not arguments.
    assert fake.init == ((), {})


def test_submit_is_run_with_the_endpoint_function_and_kwargs_as_keywords(
    client: tuple[GlobusComputeBackend, FakeClient],
) -> None:
    backend, fake = client
    kwargs = {"payload": {"model": "m"}, "openai_path": "chat/completions", "request_id": "r1"}

    task_id = backend.submit(ENDPOINT, FUNCTION, kwargs)

    assert task_id == "task-1"
    assert fake.calls == [
        (
            "run",
            (),
            {
                "endpoint_id": ENDPOINT,
                "function_id": FUNCTION,
                "payload": {"model": "m"},
                "openai_path": "chat/completions",
                "request_id": "r1",
            },
        )
    ]


def test_a_refused_submit_is_503_with_retry_after(
    client: tuple[GlobusComputeBackend, FakeClient],
) -> None:
    backend, fake = client
    fake.fail_run = RuntimeError("endpoint offline")

    with pytest.raises(ServiceUnavailableError) as refused:
        backend.submit(ENDPOINT, FUNCTION, {})

    assert refused.value.status == 503
    assert "RuntimeError" in refused.value.message
    assert refused.value.headers["Retry-After"] == "5"


@pytest.mark.parametrize(
    ("task", "state"),
    [
        ({"pending": True, "status": "waiting-for-launch"}, TaskState("pending")),
        (
            {"pending": False, "status": "success", "result": {"a": 1}},
            TaskState("success", {"a": 1}),
        ),
        (
            {"pending": False, "status": "failed", "exception": "ValueError: bad"},
            TaskState("failed", error="ValueError: bad"),
        ),
    ],
)
def test_get_task_maps_to_task_state(
    client: tuple[GlobusComputeBackend, FakeClient], task: dict[str, Any], state: TaskState
) -> None:
    backend, fake = client
    fake.tasks["t"] = task

    assert backend.task_state("t") == state
    assert fake.calls == [("get_task", ("t",), {})]


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        ({"status": "online", "details": {"total_workers": 4}}, "online"),
        # Up, but its batch job has not given it workers yet.
        ({"status": "online", "details": {"total_workers": 0}}, "starting"),
        ({"status": "offline"}, "offline"),
        ({"status": "ONLINE"}, "online"),
        ({}, "offline"),
    ],
)
def test_endpoint_status_from_get_endpoint_status(
    client: tuple[GlobusComputeBackend, FakeClient], answer: dict[str, Any], status: str
) -> None:
    backend, fake = client
    fake.endpoints[ENDPOINT] = answer

    assert backend.endpoint_status(ENDPOINT) == status
    assert fake.calls == [("get_endpoint_status", (ENDPOINT,), {})]


def test_an_endpoint_globus_does_not_know_is_offline(
    client: tuple[GlobusComputeBackend, FakeClient],
) -> None:
    backend, _ = client
    assert backend.endpoint_status("no-such-endpoint") == "offline"


def test_local_pool_endpoint_status_follows_start_and_stop() -> None:
    from first_core.compute import LocalComputeBackend

    backend = LocalComputeBackend({}, workers_per_endpoint=1)
    assert backend.endpoint_status("local-x") == "online"
    backend.stop_endpoint("local-x")
    assert backend.endpoint_status("local-x") == "offline"
