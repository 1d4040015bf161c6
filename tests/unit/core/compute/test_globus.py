"""`GlobusComputeBackend` through the real `globus-compute-sdk` Client, against the Globus
Compute stand-in (the service's shapes, a real engine behind it): what the gateway, the health
poller and the reconciler read from Globus Compute."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import responses

from compute_funcs.register import make_client, register_all
from first_core.compute import GlobusComputeBackend, TaskState, globus_client, traceback_summary
from first_core.errors import ServiceUnavailableError
from tests.support.compute import TEST_ENDPOINT_ID, ComputeStandIn


def answer(value: Any) -> Any:
    return value


def fail(message: str) -> None:
    raise ValueError(message)


def settled(backend: GlobusComputeBackend, task_id: str, timeout: float = 30.0) -> TaskState:
    deadline = time.monotonic() + timeout
    while (state := backend.task_state(task_id)).status == "pending":
        assert time.monotonic() < deadline, f"{task_id} never settled"
        time.sleep(0.05)
    return state


@pytest.fixture
def functions(globus_compute: ComputeStandIn) -> dict[str, str]:
    sdk = make_client()
    return {
        "answer": str(sdk.register_function(answer)),
        "fail": str(sdk.register_function(fail)),
    }


def test_the_client_is_pointed_at_globus_sdk_service_url_compute(
    globus_compute: ComputeStandIn,
) -> None:
    before = globus_compute.service.calls()["routes"].get("GET /v2/version", 0)

    sdk = globus_client()

    assert sdk.web_service_address == globus_compute.compute_url
    assert sdk._compute_web_client.v3.base_url.startswith(globus_compute.compute_url)
    # Its version check ran there, not at compute.api.globus.org.
    assert globus_compute.service.calls()["routes"]["GET /v2/version"] == before + 1


def test_a_submitted_task_succeeds_with_its_return_value(
    backend: GlobusComputeBackend, functions: dict[str, str]
) -> None:
    task_id = backend.submit(TEST_ENDPOINT_ID, functions["answer"], {"value": {"a": 1}})

    assert uuid.UUID(task_id)
    assert settled(backend, task_id) == TaskState("success", {"a": 1})


def test_a_failed_task_is_failed_with_the_exception_line(
    backend: GlobusComputeBackend, functions: dict[str, str]
) -> None:
    """The real Client raises TaskExecutionFailed for a failed task: never an exception out of
    task_state (the reconciler would skip the request forever)."""
    task_id = backend.submit(TEST_ENDPOINT_ID, functions["fail"], {"message": "bad input"})

    state = settled(backend, task_id)

    assert state.status == "failed"
    assert state.error == "ValueError: bad input"


def test_a_finished_task_with_only_a_reason_is_failed_not_success(
    backend: GlobusComputeBackend, globus_compute: ComputeStandIn
) -> None:
    task_id = str(uuid.uuid4())
    with responses.RequestsMock() as service:
        service.add_passthru(globus_compute.auth_url)
        service.add(
            responses.GET,
            f"{globus_compute.compute_url}/v2/tasks/{task_id}",
            json={"task_id": task_id, "status": "failed", "reason": "Task abandoned"},
        )
        state = backend.task_state(task_id)

    assert state == TaskState("failed", error="Task abandoned")


def test_a_task_globus_compute_does_not_know_is_unknown(backend: GlobusComputeBackend) -> None:
    state = backend.task_state(str(uuid.uuid4()))
    assert state.status == "unknown"
    assert state.error is not None and "404" in state.error


def test_tasks_are_not_kept_in_the_client_once_read(
    backend: GlobusComputeBackend, functions: dict[str, str]
) -> None:
    task_id = backend.submit(TEST_ENDPOINT_ID, functions["answer"], {"value": 1})
    settled(backend, task_id)
    assert backend._client._task_status_table == {}


def test_endpoint_status_online_starting_offline(
    backend: GlobusComputeBackend, globus_compute: ComputeStandIn
) -> None:
    assert backend.endpoint_status(TEST_ENDPOINT_ID) == "online"
    globus_compute.endpoint.start(workers_in=60)  # up, its workers not yet there
    assert backend.endpoint_status(TEST_ENDPOINT_ID) == "starting"
    globus_compute.endpoint.workers_arrive(0)
    globus_compute.endpoint.stop()
    assert backend.endpoint_status(TEST_ENDPOINT_ID) == "offline"
    assert backend.endpoint_status(str(uuid.uuid4())) == "offline"  # unknown to Globus


def test_a_submit_globus_compute_refuses_is_503_with_retry_after(
    backend: GlobusComputeBackend, functions: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ServiceUnavailableError) as refused:
        backend.submit(str(uuid.uuid4()), functions["answer"], {"value": 1})

    assert refused.value.status == 503
    assert refused.value.message == "Globus Compute did not accept the task; retry shortly."
    assert refused.value.headers["Retry-After"] == "5"
    # The SDK's exception, and the service's address, are for the log only.
    assert "ComputeAPIError" in caplog.text


def test_a_task_for_an_offline_endpoint_is_accepted_and_runs_when_it_returns(
    backend: GlobusComputeBackend, functions: dict[str, str], globus_compute: ComputeStandIn
) -> None:
    globus_compute.endpoint.stop()
    task_id = backend.submit(TEST_ENDPOINT_ID, functions["answer"], {"value": "late"})
    assert backend.task_state(task_id) == TaskState("pending")
    globus_compute.endpoint.start()
    assert settled(backend, task_id) == TaskState("success", "late")


def test_the_compute_functions_register_with_their_names(globus_compute: ComputeStandIn) -> None:
    from compute_funcs import FUNCTIONS
    from compute_funcs.register import make_client

    ids = register_all(make_client())

    assert set(ids) == set(FUNCTIONS)
    registered = globus_compute.service.functions
    assert {registered[i]["function_name"] for i in ids.values()} == {
        f.__name__ for f in FUNCTIONS.values()
    }


@pytest.mark.parametrize(
    ("traceback", "summary"),
    [
        (
            "+" * 68 + "\nTraceback (most recent call last):\n  File x\n"
            "RuntimeError: injected fault\n" + "-" * 68,
            "RuntimeError: injected fault",
        ),
        ("", "no traceback"),
    ],
)
def test_traceback_summary_is_the_exception_line(traceback: str, summary: str) -> None:
    assert traceback_summary(traceback) == summary
