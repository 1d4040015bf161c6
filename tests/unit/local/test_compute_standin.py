"""The Globus Compute stand-in, driven by the real `globus-compute-sdk` Client over HTTP: the
routes, shapes and rules the SDK meets in production, and endpoints that run tasks in the real
`globus-compute-endpoint` engine."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from globus_compute_sdk.errors import TaskExecutionFailed
from globus_sdk import ComputeAPIError, ConfidentialAppAuthClient
from globus_sdk.scopes import ComputeScopes

from compute_funcs.register import make_client
from first_local.compute_standin import ApiLimit, Faults
from first_local.globus_standin import COMPUTE_SCOPE, DEV_CLIENT_ID, DEV_CLIENT_SECRET
from tests.support.compute import TEST_ENDPOINT_ID, ComputeStandIn


def double(x: int) -> int:
    return 2 * x


def boom(message: str) -> None:
    raise ValueError(f"intentional failure: {message}")


def nap(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "rested"


def client() -> Any:
    return make_client()


def wait_done(sdk: Any, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task: dict[str, Any] = sdk.get_task(task_id)
        if not task["pending"]:
            return task
        assert time.monotonic() < deadline, f"task {task_id} still {task['status']}"
        time.sleep(0.05)


def token() -> str:
    auth = ConfidentialAppAuthClient(DEV_CLIENT_ID, DEV_CLIENT_SECRET)
    grant = auth.oauth2_client_credentials_tokens(requested_scopes=COMPUTE_SCOPE)
    return str(grant.by_resource_server["funcx_service"]["access_token"])


def test_the_compute_scope_is_the_sdks() -> None:
    assert str(ComputeScopes.all) == COMPUTE_SCOPE


def test_a_function_registered_through_the_sdk_runs_on_the_endpoint(
    globus_compute: ComputeStandIn,
) -> None:
    sdk = client()
    function_id = sdk.register_function(double)

    task_id = sdk.run(21, endpoint_id=TEST_ENDPOINT_ID, function_id=function_id)
    task = wait_done(sdk, task_id)

    assert uuid.UUID(function_id) and uuid.UUID(task_id)
    assert task["status"] == "success" and task["result"] == 42
    stored = globus_compute.service.functions[function_id]
    assert stored["function_name"] == "double"
    assert stored["function_code"].split("\n", 2)[1] == "04"  # DillCodeSource: code as source
    doc = globus_compute.service.task_document(task_id)
    assert doc is not None
    assert set(doc) == {"task_id", "status", "result", "completion_t", "details"}
    assert doc["details"]["endpoint_id"] == TEST_ENDPOINT_ID


def test_a_pending_task_is_its_id_and_status_only(globus_compute: ComputeStandIn) -> None:
    sdk = client()
    task_id = sdk.run(1.0, endpoint_id=TEST_ENDPOINT_ID, function_id=sdk.register_function(nap))

    doc = globus_compute.service.task_document(task_id)

    assert doc is not None and set(doc) == {"task_id", "status"}
    assert doc["status"] in ("waiting-for-nodes", "running")
    assert wait_done(sdk, task_id)["result"] == "rested"


def test_a_task_that_raises_makes_the_sdk_raise_with_the_remote_traceback(
    globus_compute: ComputeStandIn,
) -> None:
    sdk = client()
    function_id = sdk.register_function(boom)
    task_id = sdk.run("kaboom", endpoint_id=TEST_ENDPOINT_ID, function_id=function_id)

    with pytest.raises(TaskExecutionFailed) as failed:
        wait_done(sdk, task_id)

    assert "ValueError: intentional failure: kaboom" in failed.value.remote_data
    doc = globus_compute.service.task_document(task_id)
    assert doc is not None and doc["status"] == "failed" and "result" not in doc


def test_batch_status_answers_unknown_ids_with_a_reason(globus_compute: ComputeStandIn) -> None:
    sdk = client()
    done = sdk.run(2, endpoint_id=TEST_ENDPOINT_ID, function_id=sdk.register_function(double))
    wait_done(sdk, done)
    unknown = str(uuid.uuid4())

    results = sdk.get_batch_result([done, unknown])

    assert results[done]["result"] == 4
    assert results[unknown] == {"pending": False, "status": "failed", "reason": "Unknown task id"}


def test_unknown_tasks_endpoints_and_functions_are_404(globus_compute: ComputeStandIn) -> None:
    sdk = client()
    with pytest.raises(ComputeAPIError) as task:
        sdk.get_task(str(uuid.uuid4()))
    assert task.value.http_status == 404
    with pytest.raises(ComputeAPIError) as endpoint:
        sdk.run(1, endpoint_id=str(uuid.uuid4()), function_id=sdk.register_function(double))
    assert endpoint.value.http_status == 404
    with pytest.raises(ComputeAPIError) as function:
        sdk.run(1, endpoint_id=TEST_ENDPOINT_ID, function_id=str(uuid.uuid4()))
    assert function.value.http_status == 404


def test_endpoint_status_carries_the_heartbeat(globus_compute: ComputeStandIn) -> None:
    status = client().get_endpoint_status(TEST_ENDPOINT_ID)

    assert status["status"] == "online"
    details = status["details"]
    assert details["total_workers"] == 2 and details["idle_workers"] == 2
    assert details["outstanding_tasks"] == 0 and details["engine_type"] == "ProcessPoolEngine"
    assert details["heartbeat_period"] > 0


def test_tasks_for_an_offline_endpoint_wait_for_it_then_run(
    globus_compute: ComputeStandIn,
) -> None:
    sdk = client()
    function_id = sdk.register_function(double)
    globus_compute.endpoint.stop()
    assert sdk.get_endpoint_status(TEST_ENDPOINT_ID) == {"status": "offline"}

    task_id = sdk.run(5, endpoint_id=TEST_ENDPOINT_ID, function_id=function_id)
    time.sleep(0.3)
    assert sdk.get_task(task_id) == {"pending": True, "status": "waiting-for-ep"}

    globus_compute.endpoint.start()
    assert wait_done(sdk, task_id)["result"] == 10


def test_an_endpoint_without_workers_yet_reports_none_and_holds_tasks(
    globus_compute: ComputeStandIn,
) -> None:
    sdk = client()
    function_id = sdk.register_function(double)
    globus_compute.endpoint.start(workers_in=60)
    try:
        status = sdk.get_endpoint_status(TEST_ENDPOINT_ID)
        assert status["status"] == "online" and status["details"]["total_workers"] == 0
        task_id = sdk.run(3, endpoint_id=TEST_ENDPOINT_ID, function_id=function_id)
        time.sleep(0.3)
        assert sdk.get_task(task_id)["status"] == "waiting-for-nodes"
        assert sdk.get_endpoint_status(TEST_ENDPOINT_ID)["details"]["pending_tasks"] == 1
    finally:
        globus_compute.endpoint.workers_arrive(0)
    assert wait_done(sdk, task_id)["result"] == 6


def test_fail_compute_makes_the_task_raise_on_the_endpoint(globus_compute: ComputeStandIn) -> None:
    sdk = client()
    function_id = sdk.register_function(double)
    globus_compute.service.faults = Faults(fail=1.0)

    task_id = sdk.run(1, endpoint_id=TEST_ENDPOINT_ID, function_id=function_id)

    with pytest.raises(TaskExecutionFailed) as failed:
        wait_done(sdk, task_id)
    assert "RuntimeError: injected fault" in failed.value.remote_data


def test_a_killed_worker_fails_only_its_task_and_is_replaced(
    globus_compute: ComputeStandIn,
) -> None:
    sdk = client()
    slow = sdk.register_function(nap)
    quick = sdk.register_function(double)
    # One worker busy with a task that must survive; the other gets the task that is killed.
    survivor = sdk.run(1.5, endpoint_id=TEST_ENDPOINT_ID, function_id=slow)
    time.sleep(0.2)
    globus_compute.service.faults = Faults(kill=1.0)
    killed = sdk.run(1.0, endpoint_id=TEST_ENDPOINT_ID, function_id=slow)
    globus_compute.service.faults = Faults()

    with pytest.raises(TaskExecutionFailed) as failed:
        wait_done(sdk, killed)
    assert "BrokenProcessPool" in failed.value.remote_data
    assert wait_done(sdk, survivor)["result"] == "rested"
    # The endpoint is whole again: both workers take tasks.
    tasks = [sdk.run(n, endpoint_id=TEST_ENDPOINT_ID, function_id=quick) for n in range(4)]
    assert [wait_done(sdk, t)["result"] for t in tasks] == [0, 2, 4, 6]
    assert sdk.get_endpoint_status(TEST_ENDPOINT_ID)["details"]["total_workers"] == 2


def test_calls_beyond_the_limit_are_429_with_retry_after_and_counted(
    globus_compute: ComputeStandIn,
) -> None:
    globus_compute.service.set_limit(ApiLimit(3, 30))
    headers = {"Authorization": f"Bearer {token()}"}
    url = f"{globus_compute.compute_url}/v2/endpoints/{TEST_ENDPOINT_ID}/status"
    before = globus_compute.service.calls()

    answers = [httpx.get(url, headers=headers) for _ in range(4)]

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert 1 <= int(answers[3].headers["retry-after"]) <= 30
    assert answers[3].json()["code"] == "TOO_MANY_REQUESTS"
    calls = globus_compute.service.calls()
    route = "GET /v2/endpoints/{endpoint_id}/status"
    assert calls["routes"][route] - before["routes"].get(route, 0) == 4
    assert calls["throttled"] - before["throttled"] == 1
    assert calls["clients"][DEV_CLIENT_ID] - before["clients"].get(DEV_CLIENT_ID, 0) == 4


def test_the_sdk_waits_out_a_429_and_gets_through(globus_compute: ComputeStandIn) -> None:
    sdk = client()  # version check: one call
    globus_compute.service.set_limit(ApiLimit(2, 1))
    started = time.monotonic()

    statuses = [sdk.get_endpoint_status(TEST_ENDPOINT_ID)["status"] for _ in range(4)]

    assert statuses == ["online"] * 4
    assert time.monotonic() - started >= 0.9  # it slept on Retry-After
    assert globus_compute.service.calls()["throttled"] >= 1


def test_every_call_needs_a_compute_token(globus_compute: ComputeStandIn) -> None:
    url = f"{globus_compute.compute_url}/v2/version"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer made-up"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {token()}"}).json()["min_sdk_version"]


def test_a_submission_over_10_mb_is_413(globus_compute: ComputeStandIn) -> None:
    sdk = client()
    function_id = sdk.register_function(double)
    with pytest.raises(ComputeAPIError) as refused:
        sdk.run("x" * (11 * 1024 * 1024), endpoint_id=TEST_ENDPOINT_ID, function_id=function_id)
    assert refused.value.http_status == 413
