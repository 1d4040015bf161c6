"""Odd bytes, leaky errors, missing headers and clients that leave, tried as an attacker would
against the running local stack over raw HTTP (issue 15, items 5 and 7).

- A lone surrogate (`"\\ud800"`) anywhere in a JSON body: 400 `invalid_unicode`, every route.
- A header value that is not UTF-8 (byte 0xff): 400 `invalid_header`, every route.
- `GET /v1/usage` at the calendar's edges: 400 naming the bounds, never a 500.
- A compute task that raises: the client's error names no exception class or address.
- `nosniff` and `no-store` on answers: 200, 4xx, streams; proxy and control plane.
- A client that leaves while its request waits (or mid-stream): the request ends `cancelled`,
  counted `cancelled`, and the proxy logs no 500.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from boto3.dynamodb.conditions import Attr

from first_local.globus_standin import mint_token
from first_local.stack import stack_process
from tests.conftest import CALLBACK_SECRET
from tests.contract.conftest import STACK_ENV, Stack
from tests.support.contract import scan_all, usage_rows, wait_until_ended

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
EMBEDDING_MODEL = "Salesforce/SFR-Embedding-Mistral"
SMALL = ("--workers", "1", "--compute-api-limit", "0", "--health-every", "0", "--metrics")
# What an error body must not show: exception class names, tracebacks, addresses.
LEAKS = re.compile(
    r"[A-Z]\w*(?:Error|Exception|Failed|Pool)\b|Traceback|File \"|https?://|127\.0\.0\.1|localhost"
)


def bearer(user: str = "dave") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(user)}"}


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    where = f"{response.request.method} {response.request.url} -> {response.status_code}: "
    assert response.status_code == status, where + response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, where + response.text
    assert isinstance(error["message"], str) and error["message"], where + response.text
    if code is not None:
        assert error["code"] == code, where + response.text


def assert_no_leak(text: str) -> None:
    assert LEAKS.search(text) is None, text




@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, timeout=30) as client:
        yield client


# -- lone surrogates --------------------------------------------------------------------------

CHAT = f'"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 3'
SURROGATE_BODIES = {
    "model name": ("/v1/chat/completions", '{"model": "\\ud800", "messages": []}'),
    "key": ("/v1/chat/completions", "{" + CHAT + ', "\\udfff": 1}'),
    "message content": (
        "/v1/chat/completions",
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "a\\udc00b"}}]}}',
    ),
    "stop (deep)": ("/v1/chat/completions", "{" + CHAT + ', "stop": ["ok", "\\ud83d"]}'),
    "user": (
        "/resource_server/v1/sophia/vllm/v1/chat/completions",
        "{" + CHAT + ', "user": "\\uDBFF"}',
    ),
    "prompt": ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "\\ud800", "max_tokens": 2}}'),
    "embedding input": (
        "/v1/embeddings",
        f'{{"model": "{EMBEDDING_MODEL}", "input": ["\\ud800"]}}',
    ),
}


@pytest.mark.parametrize("case", sorted(SURROGATE_BODIES))
def test_a_lone_surrogate_in_an_inference_body_is_400(http: httpx.Client, case: str) -> None:
    path, body = SURROGATE_BODIES[case]
    response = http.post(
        path, content=body.encode(), headers={**bearer(), "Content-Type": "application/json"}
    )
    assert_openai_error(response, 400, "invalid_unicode")


def test_a_paired_surrogate_is_ordinary_text(http: httpx.Client) -> None:
    """An emoji written as its two UTF-16 escapes is valid: served, not refused."""
    body = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "\\ud83d\\ude00"}}],'
    response = http.post(
        "/v1/chat/completions",
        content=(body + '"max_tokens": 3}').encode(),
        headers={**bearer(), "Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text


def test_a_lone_surrogate_in_a_control_plane_body_is_400(http: httpx.Client) -> None:
    headers = {**bearer(), "Content-Type": "application/json"}
    batches = [
        '{"input_file_id": "\\ud800", "endpoint": "/v1/chat/completions", '
        '"completion_window": "24h"}',
        '{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", '
        '"completion_window": "24h", "metadata": {"\\ud800": "x"}}',
    ]
    for body in batches:
        assert_openai_error(http.post("/v1/batches", content=body.encode(), headers=headers), 400)
    first = f'{{"model": "{MODEL}", "input_file": "in\\udfff.jsonl"}}'
    response = http.post(
        "/resource_server/v1/sophia/vllm/v1/batches", content=first.encode(), headers=headers
    )
    assert_openai_error(response, 400, "invalid_unicode")
    line = (
        '{"custom_id": "a\\ud800", "method": "POST", "url": "/v1/chat/completions", "body": {'
        + CHAT
        + "}}"
    )
    response = http.post(
        "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", line)}, headers=bearer()
    )
    assert_openai_error(response, 400, "invalid_batch_line")
    assert "surrogate" in response.json()["error"]["message"]


@pytest.mark.parametrize("sink", ["", "/stream"])
def test_a_lone_surrogate_in_a_signed_callback_is_400(http: httpx.Client, sink: str) -> None:
    """Even with the right callback token (a buggy or compromised cluster)."""
    request_id = "req_" + "5" * 32
    token = hmac.new(CALLBACK_SECRET.encode(), request_id.encode(), hashlib.sha256).hexdigest()
    body = f'{{"request_id": "{request_id}", "status_code": 200, "body": {{"x": "\\ud800"}}}}'
    if sink:
        body = f'{{"request_id": "{request_id}", "seq": 0, "chunks": ["\\ud800"], "done": false}}'
    response = http.post(
        f"/callbacks/{request_id}{sink}",
        content=body.encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert_openai_error(response, 400)


# -- headers that are not UTF-8 ---------------------------------------------------------------

ROUTES = [
    ("POST", "/v1/chat/completions", "{" + CHAT + "}"),
    (
        "POST",
        "/resource_server/v1/sophia/vllm/v1/embeddings",
        json.dumps({"model": EMBEDDING_MODEL, "input": "x"}),
    ),
    ("GET", "/v1/models", ""),
    ("GET", "/v1/usage", ""),
    ("GET", "/resource_server/v1/whoami", ""),
    ("GET", "/v1/files", ""),
    ("POST", "/v1/batches", "{}"),
    ("GET", "/health", ""),
    ("POST", "/callbacks/req_x", "{}"),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize("header", [b"x-odd", b"authorization", b"user-agent"])
def test_a_header_that_is_not_utf8_is_400(
    http: httpx.Client, method: str, path: str, body: str, header: bytes
) -> None:
    headers = [
        (b"authorization", bearer()["Authorization"].encode()),
        (b"content-type", b"application/json"),
    ]
    odd = b"Bearer \xff\xfe" if header == b"authorization" else b"caf\xe9 \xff"
    headers = [(k, v) for k, v in headers if k != header] + [(header, odd)]
    response = http.request(method, path, content=body.encode(), headers=headers)
    assert_openai_error(response, 400, "invalid_header")
    assert response.headers["x-content-type-options"] == "nosniff"


def test_a_utf8_header_that_is_not_ascii_is_fine(http: httpx.Client) -> None:
    headers = {**bearer(), "X-Title": "caf\u00e9 \u2603".encode()}
    assert http.get("/v1/models", headers=headers).status_code == 200
    response = http.post(
        "/v1/chat/completions", content=("{" + CHAT + "}").encode(), headers=headers
    )
    assert response.status_code == 200, response.text


# -- usage at the calendar's edges ------------------------------------------------------------

CALENDAR_EDGES = [
    "start_date=0001-01-01",
    "end_date=0001-01-01",
    "end_date=0001-01-05",
    "start_date=0001-01-01&end_date=0001-01-01",
    "end_date=9999-12-31",
    "start_date=9999-12-31",
    "start_date=9999-12-31&end_date=9999-12-31",
    "start_date=9999-12-02&end_date=9999-12-31&user=all",
    "start_date=10000-01-01",
    "end_date=0000-01-01",
    "end_date=-0001-01-01",
    "start_date=1999-12-31",
    "end_date=3000-01-01",
]


@pytest.mark.parametrize("query", CALENDAR_EDGES)
def test_usage_at_the_edges_of_the_calendar_is_a_400(http: httpx.Client, query: str) -> None:
    response = http.get(f"/v1/usage?{query}", headers=bearer("dave"))  # dave is an admin
    assert_openai_error(response, 400)
    assert response.json()["error"]["param"] in ("start_date", "end_date")


def test_usage_within_the_bounds_still_answers(http: httpx.Client) -> None:
    for query in ["start_date=2000-01-01&end_date=2000-12-31", "end_date=2999-12-31"]:
        response = http.get(f"/v1/usage?{query}", headers=bearer())
        assert response.status_code == 200, response.text
        assert response.json()["data"] == []


# -- security headers -------------------------------------------------------------------------


def assert_secured(response: httpx.Response) -> None:
    where = f"{response.request.method} {response.request.url} -> {response.status_code}"
    assert response.headers.get_list("x-content-type-options") == ["nosniff"], where
    assert response.headers.get_list("cache-control") == ["no-store"], where


def test_nosniff_and_no_store_on_answers_of_both_apps(http: httpx.Client) -> None:
    chat = ("{" + CHAT + "}").encode()
    json_type = {"Content-Type": "application/json"}
    answers = [
        http.get("/v1/models", headers=bearer()),  # 200, control plane
        http.post("/v1/chat/completions", content=chat, headers={**bearer(), **json_type}),
        http.get("/v1/requests/req_nobody", headers=bearer()),  # 404, control plane
        http.get("/v1/models"),  # 401, control plane
        http.post("/v1/chat/completions", content=b"{}", headers={**bearer(), **json_type}),
        http.post("/v1/chat/completions", content=chat, headers=json_type),  # 401, proxy
        http.get("/v1/nowhere", headers=bearer()),  # 404 from the local gateway itself
    ]
    assert [a.status_code for a in answers] == [200, 200, 404, 401, 400, 401, 404]
    for answer in answers:
        assert_secured(answer)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body, headers=bearer()) as stream:
        assert stream.status_code == 200
        assert_secured(stream)
        assert b"[DONE]" in stream.read()


# -- errors name no class and no address ------------------------------------------------------


def test_a_failing_compute_task_is_told_in_user_words(tmp_path: Path) -> None:
    """`--fail-compute 1`: every task raises `RuntimeError` on the endpoint. The client's 502,
    the stream's error and `GET /v1/requests/{id}` say what happened, without the class name
    (the log has it)."""
    log = tmp_path / "stack.log"
    with stack_process(
        *SMALL,
        "--fail-compute",
        "1",
        "--reconcile-every",
        "1",
        "--reconcile-grace",
        "1",
        "--result-wait",
        "30",
        env=STACK_ENV,
        log=log,
    ) as state:
        stack = Stack(state["base_url"], state)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        response = httpx.post(
            f"{stack.base_url}/v1/chat/completions", json=body, headers=bearer(), timeout=60
        )
        assert_openai_error(response, 502)
        message = response.json()["error"]["message"]
        assert "injected fault" in message  # what happened, still said
        assert_no_leak(message)
        request_id = response.headers["x-first-request-id"]
        item = wait_until_ended(stack, request_id)
        assert item["status"] == "failed"
        assert_no_leak(item["error"])
        seen = httpx.get(f"{stack.base_url}/v1/requests/{request_id}", headers=bearer())
        assert seen.json()["status"] == "failed"
        assert_no_leak(seen.text)
        with httpx.stream(
            "POST",
            f"{stack.base_url}/v1/chat/completions",
            json={**body, "stream": True},
            headers=bearer(),
            timeout=60,
        ) as stream:
            text = stream.read().decode()
        assert "injected fault" in text and stream.status_code in (200, 502)
        assert_no_leak(text)
        assert "RuntimeError" in log.read_text(errors="replace")  # the detail is in the log


# -- clients that leave -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hanging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """vLLM never answers (`--backend-hang 1`): every request waits."""
    log = tmp_path_factory.mktemp("hang") / "stack.log"
    with stack_process(
        *SMALL,
        "--backend-hang",
        "1",
        "--result-wait",
        "60",
        "--reconcile-every",
        "0",
        env=STACK_ENV,
        log=log,
    ) as state:
        yield Stack(state["base_url"], {**state, "log": str(log)})




def proxy_lines(stack: Stack, request_id: str) -> list[str]:
    lines = Path(stack.state["log"]).read_text(errors="replace").splitlines()
    return [line for line in lines if request_id in line]


def leave_after(stack: Stack, seconds: float, *, stream: bool) -> str:
    """Send a chat request and hang up after `seconds`; its request id, from the records."""
    every = Attr("request_id").exists()
    before = {i["request_id"] for i in scan_all(stack, "requests", every)}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.stream(
            "POST",
            f"{stack.base_url}/v1/chat/completions",
            json={**body, "stream": stream},
            headers=bearer(),
            timeout=seconds,
        ) as response,
    ):
        response.read()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        new = {i["request_id"] for i in scan_all(stack, "requests", every)} - before
        if new:
            return new.pop()
        time.sleep(0.1)
    raise AssertionError("no request record was written")


@pytest.mark.parametrize("stream", [False, True], ids=["waiting", "mid-stream"])
def test_a_client_that_leaves_is_a_cancelled_request(hanging: Stack, stream: bool) -> None:
    request_id = leave_after(hanging, 2.5 if stream else 1.5, stream=stream)
    item = wait_until_ended(hanging, request_id)
    assert item["status"] == "cancelled" and "error" not in item
    deadline = time.monotonic() + 10  # the usage record is written just after the record ends
    while not (usage := usage_rows(hanging, request_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [row["status"] for row in usage] == ["cancelled"]
    log = Path(hanging.state["log"]).read_text(errors="replace")
    assert "Exception in ASGI application" not in log
    assert '"Outcome":"error"' not in log
    lines = proxy_lines(hanging, request_id)
    assert any("client disconnected" in line and '"level":"INFO"' in line for line in lines)
    cancelled = [
        json.loads(line)
        for line in log.splitlines()
        if line.startswith('{"_aws"') and '"Outcome":"cancelled"' in line
    ]
    assert cancelled and all(m["Route"] == "chat/completions" for m in cancelled)
