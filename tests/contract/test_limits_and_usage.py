"""Rate limits and usage, with the real `openai` package against the real local stack.

The limits are met on a model of their own (`meta-llama/Llama-3.2-1B-Instruct` on polaris:
2 requests per second and 300 tokens per minute per user, infra/registry/local.yaml), so no
other test is throttled. One test starts a second gateway process on the same moto server
(`first-gateway dev --join STATE_FILE`) and shows a limit holding exactly across both.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from boto3.dynamodb.conditions import Attr

from first_local.globus_standin import mint_token
from first_local.stack import stack_process
from tests.contract.conftest import STACK_ENV, Stack
from tests.support.contract import counter, requests_counted, user_id

SMALL = "meta-llama/Llama-3.2-1B-Instruct"
RPS_LIMIT = 2
TPM_LIMIT = 300
HELLO = [{"role": "user", "content": "Hi"}]


def request_count(stack: Stack, uid: str) -> int:
    table = stack.table("requests")
    total, start = 0, None
    while True:
        kwargs: dict[str, Any] = {"FilterExpression": Attr("user_id").eq(uid), "Select": "COUNT"}
        if start:
            kwargs["ExclusiveStartKey"] = start
        page = table.scan(**kwargs)
        total += page["Count"]
        start = page.get("LastEvaluatedKey")
        if not start:
            return total


def eventually(check: Any, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def at_start_of_a_second() -> int:
    """Sleep to just after the next whole second; return it."""
    now = time.time()
    second = int(now) + 1
    time.sleep(second - now + 0.005)
    return second


def assert_rate_limited(error: openai.RateLimitError) -> dict[str, Any]:
    body = error.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "rate_limit_error"
    assert SMALL in body["error"]["message"]
    return dict(body["error"])


def test_over_the_requests_per_second_limit_is_a_429_and_nothing_is_submitted(
    stack: Stack,
) -> None:
    client = stack.client("alice")
    uid = user_id(stack, "alice")
    client.models.list()  # warm this token's verdict, so the three requests come quickly
    for _attempt in range(3):
        before = request_count(stack, uid)
        second = at_start_of_a_second()
        for _ in range(RPS_LIMIT):
            client.chat.completions.create(model=SMALL, messages=HELLO, max_tokens=2)
        try:
            client.chat.completions.create(model=SMALL, messages=HELLO, max_tokens=2)
        except openai.RateLimitError as error:
            refused = error
            break
        # Served: the three requests straddled two windows (a slow moment); again.
        assert int(time.time()) != second, "the third request in one second was served"
    else:
        pytest.fail("three tries, never three requests within one second")
    error = assert_rate_limited(refused)
    assert error["code"] == "rate_limit_exceeded"
    assert "2 request(s) per second" in error["message"]
    assert refused.response.headers["retry-after"] == "1"
    # Nothing was submitted: no request record (and so no compute task) for the refused one.
    assert request_count(stack, uid) == before + RPS_LIMIT
    assert requests_counted(stack, uid, SMALL, second) == RPS_LIMIT
    # The next second serves again.
    at_start_of_a_second()
    assert client.chat.completions.create(model=SMALL, messages=HELLO, max_tokens=2).choices


def test_over_the_tokens_per_minute_limit_is_a_429_and_nothing_is_submitted(
    stack: Stack,
) -> None:
    # dave, so alice's requests on this model (the other tests) do not count against it.
    client = stack.client("dave")
    uid = user_id(stack, "dave")
    if time.time() % 60 > 50:  # keep the test inside one minute
        time.sleep(61 - time.time() % 60)
    minute = int(time.time() // 60)
    key = f"tpm#{uid}#{SMALL}#{minute}"
    # 180 completion tokens are reserved (plus the prompt's estimate) and all used.
    first = client.chat.completions.create(
        model=SMALL,
        messages=[{"role": "user", "content": "[mock:tokens=400] Tell a story"}],
        max_tokens=180,
    )
    assert first.usage is not None and first.usage.completion_tokens == 180
    # Settled to the real use once the request ended (the callback ends it just after it
    # wrote the result the proxy answered from).
    assert eventually(lambda: counter(stack, key) == first.usage.total_tokens)  # type: ignore[union-attr]
    before = request_count(stack, uid)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=SMALL, messages=HELLO, max_tokens=150)
    error = assert_rate_limited(refused.value)
    assert error["code"] == "rate_limit_exceeded"
    assert f"{TPM_LIMIT} tokens per minute per user" in error["message"]
    retry_after = int(refused.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert abs(retry_after - (60 - time.time() % 60)) <= 2
    assert request_count(stack, uid) == before
    assert counter(stack, key) == first.usage.total_tokens  # a refusal takes nothing
    # A request that could never fit in a minute says so.
    with pytest.raises(openai.RateLimitError) as too_large:
        client.chat.completions.create(model=SMALL, messages=HELLO, max_tokens=1000)
    assert assert_rate_limited(too_large.value)["code"] == "request_too_large"
    assert request_count(stack, uid) == before
    # What still fits this minute is served (streamed too), in a fresh second: the refused
    # request counted against the 2 requests per second.
    at_start_of_a_second()
    small = client.chat.completions.create(model=SMALL, messages=HELLO, max_tokens=5, stream=True)
    assert any(chunk.choices for chunk in small)


def _usage(stack: Stack, as_user: str, **params: str) -> httpx.Response:
    return httpx.get(
        f"{stack.base_url}/v1/usage",
        params=params,
        headers={"authorization": f"Bearer {mint_token(as_user)}"},
    )


def _ended_records(stack: Stack, uid: str) -> tuple[list[dict[str, Any]], set[str]]:
    """One user's ended requests and batches (each has a usage record), and the models of
    those still open (their totals are still moving)."""
    ended: list[dict[str, Any]] = []
    open_models: set[str] = set()
    for table, open_states in (
        ("requests", ("submitted", "running")),
        ("batches", ("validating", "in_progress", "finalizing", "cancelling")),
    ):
        scan: dict[str, Any] = {"FilterExpression": Attr("user_id").eq(uid)}
        while True:
            page = stack.table(table).scan(ConsistentRead=True, **scan)
            for item in page["Items"]:
                if item["status"] in open_states:
                    open_models.add(str(item["model"]))
                elif table == "requests" or item.get("cluster"):
                    # A batch refused at validation never ran: no usage record.
                    ended.append(item)
            if "LastEvaluatedKey" not in page:
                break
            scan["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    return ended, open_models


def _totals_from_request_records(stack: Stack, uid: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (day, model): the ended requests and batches of one user, added up."""
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    ended, open_models = _ended_records(stack, uid)
    for item in ended:
        day = datetime.fromtimestamp(float(item["created_at"]), tz=UTC).strftime("%Y-%m-%d")
        entry = totals.setdefault(
            (day, str(item["model"])),
            {
                "requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
                "by_status": {},
            },
        )
        entry["requests"] += 1
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            entry[name] += int(item.get(name) or 0)
        entry["by_status"][item["status"]] = entry["by_status"].get(item["status"], 0) + 1
    return {key: value for key, value in totals.items() if key[1] not in open_models}


def test_usage_shows_the_callers_own_requests_and_tokens(stack: Stack) -> None:
    client = stack.client("alice")
    reply = client.chat.completions.create(
        model="meta-llama/Meta-Llama-3.1-70B-Instruct", messages=HELLO, max_tokens=7
    )
    streamed = list(
        client.chat.completions.create(
            model="meta-llama/Meta-Llama-3.1-70B-Instruct",
            messages=HELLO,
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert reply.usage is not None and streamed[-1].usage is not None
    uid = user_id(stack, "alice")
    expected = _totals_from_request_records(stack, uid)
    response = _usage(stack, "alice")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and body["user"] == uid
    got = {
        (row["date"], row["model"]): {k: v for k, v in row.items() if k not in ("date", "model")}
        for row in body["data"]
    }
    assert expected, "alice has ended requests"
    for key, totals in expected.items():
        assert got[key] == totals, key
    today = datetime.now(tz=UTC).strftime("%Y-%m-%d")
    big = got[(today, "meta-llama/Meta-Llama-3.1-70B-Instruct")]
    assert big["requests"] >= 2
    assert big["total_tokens"] >= reply.usage.total_tokens + streamed[-1].usage.total_tokens
    # A usage record per ended request, with its timings.
    rows = stack.table("usage").query(
        KeyConditionExpression="user_id = :u",
        ExpressionAttributeValues={":u": uid},
        ConsistentRead=True,
    )["Items"]
    assert sum(1 for r in rows if r["stream"]) >= 1
    for row in rows:
        assert row["total_ms"] >= 0
        if row["stream"] and row["status"] == "completed":
            assert 0 <= row["first_token_ms"] <= row["total_ms"]


def test_usage_of_others_is_for_admins_only(stack: Stack) -> None:
    stack.client("alice").chat.completions.create(
        model="meta-llama/Meta-Llama-3-8B-Instruct", messages=HELLO, max_tokens=3
    )
    alice = user_id(stack, "alice")
    forbidden = _usage(stack, "alice", user="all")
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["type"] == "permission_error"
    assert _usage(stack, "alice", user=user_id(stack, "dave")).status_code == 403
    bob = _usage(stack, "bob")
    assert bob.status_code == 403  # bob may use nothing, this route included
    assert _usage(stack, "alice", start_date="not-a-date").status_code == 400

    own = {(r["date"], r["model"]): r for r in _usage(stack, "alice").json()["data"]}
    everyone = _usage(stack, "dave", user="all")
    assert everyone.status_code == 200 and everyone.json()["user"] == "all"
    alices = {(r["date"], r["model"]): r for r in everyone.json()["data"] if r["user_id"] == alice}
    for key in own:
        for name in ("requests", "total_tokens"):
            # Admin's view was read after alice's own: it can only have grown.
            assert alices[key][name] >= own[key][name]
    one = _usage(stack, "dave", user=alice)
    assert one.status_code == 200
    assert {(r["date"], r["model"]) for r in one.json()["data"]} >= set(own)


@pytest.fixture
def second_gateway(stack: Stack, tmp_path: Path) -> Iterator[str]:
    """Another `first-gateway dev` process on the same moto server, stand-in and backend."""
    first_state = tmp_path / "first.json"
    first_state.write_text(json.dumps(stack.state))
    with stack_process(
        "--join",
        str(first_state),
        "--workers",
        "2",
        env=STACK_ENV,
        log=tmp_path / "second.log",
        timeout=90,
    ) as state:
        yield str(state["base_url"])


def test_two_gateway_processes_on_one_moto_hold_the_limit_exactly(
    stack: Stack, second_gateway: str
) -> None:
    assert second_gateway != stack.base_url
    token = mint_token("alice")
    clients = [
        openai.OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0, timeout=30)
        for base in (stack.base_url, second_gateway)
    ]
    for client in clients:  # warm both processes' token and registry caches
        client.models.list()
    uid = user_id(stack, "alice")
    per_gateway = 10

    for attempt in range(3):
        outcomes: list[tuple[int, str]] = []
        lock = threading.Lock()
        gate = threading.Barrier(2 * per_gateway)

        def fire(
            index: int,
            gate: threading.Barrier = gate,
            lock: threading.Lock = lock,
            outcomes: list[tuple[int, str]] = outcomes,
        ) -> None:
            client = clients[index % 2]
            gate.wait()
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=SMALL, messages=HELLO, max_tokens=2
                )
                raw.parse()
                result = (200, raw.headers["x-first-request-id"])
            except openai.RateLimitError as refused:
                assert_rate_limited(refused)
                result = (429, refused.response.headers["retry-after"])
            with lock:
                outcomes.append(result)

        second = at_start_of_a_second()
        with ThreadPoolExecutor(max_workers=2 * per_gateway) as pool:
            list(pool.map(fire, range(2 * per_gateway)))
        windows = {
            s: requests_counted(stack, uid, SMALL, s) for s in range(second - 1, second + 4)
        }
        touched = {s: n for s, n in windows.items() if n}
        if len(touched) == 1 or attempt == 2:
            break  # else the burst straddled a second: again, in a fresh one
        time.sleep(1)

    assert touched == {second: RPS_LIMIT}, f"the burst spread over {touched}"
    statuses = [status for status, _ in outcomes]
    assert len(statuses) == 2 * per_gateway
    assert statuses.count(200) == RPS_LIMIT
    assert statuses.count(429) == 2 * per_gateway - RPS_LIMIT
    # Without the atomic condition each process would let RPS_LIMIT through.
