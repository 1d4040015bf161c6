"""Callbacks trusted only within their bounds (issue 15, items 4 and 6), tried as an attacker who
holds a valid callback token would (a leaked token, or a cluster-side bug): the test process
knows the local stack's callback secret, so it signs its own callbacks.

Each out-of-range callback is a 400 in OpenAI's shape (never a 500) and changes nothing: the
client still gets its real answer, the rate counters are not credited, an ended stream keeps its
answer; an answer over the cap ends the request failed with a clear error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from boto3.dynamodb.conditions import Attr

from first_local.globus_standin import DEV_IDENTITIES, mint_token
from tests.conftest import CALLBACK_SECRET
from tests.contract.conftest import Stack
from tests.support.contract import scan_all, snapshot, usage_rows

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
MAX_PAYLOAD_BYTES = 10 * 1024 * 1024  # settings.max_payload_bytes (default)
ENDED = ("completed", "failed", "cancelled", "expired")
# The mock vLLM answers after this long, so a forged callback can come before the real one.
SLOW = "[mock:delay=2000] Tell me something."


def callback_token(object_id: str) -> str:
    return hmac.new(CALLBACK_SECRET.encode(), object_id.encode(), hashlib.sha256).hexdigest()


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI-shaped error of a response with this status."""
    assert response.status_code == status, response.text[:300]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return dict(body["error"])


def finished_request(stack: Stack, *, stream: bool) -> str:
    """A request of alice's, completed (its usage record written)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    with httpx.stream(
        "POST",
        f"{stack.base_url}/v1/chat/completions",
        json={**body, "stream": stream},
        headers={"Authorization": f"Bearer {mint_token('alice')}"},
        timeout=30,
    ) as response:
        response.read()
        assert response.status_code == 200, response.text
        request_id = str(response.headers["x-first-request-id"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (stack.item("requests", request_id) or {}).get("status") == "completed" and usage_rows(
            stack, request_id
        ):
            return request_id
        time.sleep(0.05)
    raise AssertionError(f"{request_id} did not end: {stack.item('requests', request_id)}")






def batch_line(custom_id: str, text: str) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": body})  # fmt: skip


def wait_for_batch(client: openai.OpenAI, batch_id: str, until: Any) -> Any:
    deadline = time.monotonic() + 120
    while not until(batch := client.batches.retrieve(batch_id)):
        assert time.monotonic() < deadline, f"{batch_id} stuck: {batch}"
        time.sleep(0.25)
    return batch


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as executor:
        yield executor


def forge(stack: Stack, request_id: str, body: Any, sink: str = "") -> httpx.Response:
    """A callback signed with the request's (or batch's) real callback token."""
    return httpx.post(
        f"{stack.base_url}/callbacks/{request_id}{sink}",
        content=body if isinstance(body, bytes) else json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {callback_token(request_id)}",
        },
        timeout=60,
    )


def pending_request(
    stack: Stack, pool: ThreadPoolExecutor, user: str = "alice", model: str = MODEL
) -> tuple[Future[httpx.Response], str]:
    """A slow chat request in flight, and its id (read from the requests table once written)."""
    since = Decimal(int(time.time()) - 1)
    body = {"model": model, "messages": [{"role": "user", "content": SLOW}], "max_tokens": 20}
    future = pool.submit(
        httpx.post,
        f"{stack.base_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {mint_token(user)}"},
        timeout=30,
    )
    uid = DEV_IDENTITIES[user].sub
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # Every page: records hold their answers, so the table outgrows one scan page.
        found = scan_all(
            stack,
            "requests",
            Attr("user_id").eq(uid)
            & Attr("created_at").gte(since)
            & Attr("status").eq("submitted"),
        )
        if found:
            assert len(found) == 1, found
            return future, str(found[0]["request_id"])
        time.sleep(0.02)
    raise AssertionError(f"no request record appeared: {future.result().text[:300]}")


def answer(request_id: str, status_code: Any = 200, **usage: Any) -> dict[str, Any]:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "forged"}}]}
    if usage:
        body["usage"] = usage
    return {"request_id": request_id, "status_code": status_code, "body": body}


def counter(stack: Stack, key: str) -> int:
    item = stack.table("rate_counters").get_item(Key={"key": key}, ConsistentRead=True)
    return int(item.get("Item", {}).get("used", 0))


def request_view(stack: Stack, request_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{stack.base_url}/v1/requests/{request_id}",
        headers={"Authorization": f"Bearer {mint_token('alice')}"},
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


# -- results ------------------------------------------------------------------------------------


def test_a_status_code_out_of_range_is_400_and_the_client_still_gets_its_answer(
    stack: Stack, pool: ThreadPoolExecutor
) -> None:
    future, request_id = pending_request(stack, pool)
    for status in [99, 600, "200", 1.5, True, None, -1, 10**40]:
        response = forge(stack, request_id, answer(request_id, status))
        assert error_of(response, 400)["type"] == "invalid_request_error", status
    submitted = stack.item("requests", request_id) or {}
    assert submitted["status"] == "submitted" and "response_status" not in submitted

    real = future.result()
    assert real.status_code == 200, real.text
    assert real.headers["x-first-request-id"] == request_id
    content = real.json()["choices"][0]["message"]["content"]
    assert content and content != "forged"


def test_negative_usage_never_credits_the_rate_counter(
    stack: Stack, pool: ThreadPoolExecutor
) -> None:
    # dave's counter on MODEL: no other test's requests settle into it meanwhile (alice's do on
    # MODEL, dave's on the rate-limit tests' small model).
    if time.time() % 60 > 45:  # inside one minute's window
        time.sleep(61 - time.time() % 60)
    minute = f"tpm#{DEV_IDENTITIES['dave'].sub}#{MODEL}#{int(time.time() // 60)}"
    before = counter(stack, minute)
    future, request_id = pending_request(stack, pool, "dave", MODEL)
    reserved = counter(stack, minute) - before
    assert reserved > 0
    for usage in [
        {"prompt_tokens": -100_000, "completion_tokens": 5, "total_tokens": -99_995},
        {"prompt_tokens": 5, "completion_tokens": -100_000, "total_tokens": 5},
        {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": -100_000},
    ]:
        response = forge(stack, request_id, answer(request_id, **usage))
        assert error_of(response, 400)["param"] == "usage"
        assert counter(stack, minute) == before + reserved  # nothing given back
    real = future.result()
    assert real.status_code == 200, real.text
    used = real.json()["usage"]["total_tokens"]
    # Settled to the real use once the request ended, never below it.
    deadline = time.monotonic() + 5
    while counter(stack, minute) != before + used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counter(stack, minute) == before + used
    # A replay after the end, negative: refused, and the counter stays.
    response = forge(stack, request_id, answer(request_id, prompt_tokens=-(10**6)))
    assert error_of(response, 400)
    assert counter(stack, minute) == before + used


def test_usage_beyond_what_was_asked_for_is_400(stack: Stack, pool: ThreadPoolExecutor) -> None:
    future, request_id = pending_request(stack, pool)  # max_tokens 20, n 1
    for usage in [
        {"prompt_tokens": 3, "completion_tokens": 21},
        {"prompt_tokens": 10**6, "completion_tokens": 3},  # more tokens than the prompt's bytes
    ]:
        response = forge(stack, request_id, answer(request_id, **usage))
        assert error_of(response, 400)["code"] == "invalid_callback_body"
    real = future.result()
    assert real.status_code == 200 and real.json()["usage"]["completion_tokens"] <= 20


def test_giant_numbers_are_400_not_500(stack: Stack) -> None:
    done = finished_request(stack, stream=False)
    streamed = finished_request(stack, stream=True)
    before = {done: snapshot(stack, done), streamed: snapshot(stack, streamed)}
    giant = 10**40  # DynamoDB keeps 38 digits
    for body in [
        answer(done, prompt_tokens=giant, completion_tokens=1),
        answer(done, prompt_tokens=1, completion_tokens=1, total_tokens=giant),
        answer(done, status_code=giant),
        answer(done, prompt_tokens=1e300),
    ]:
        assert error_of(forge(stack, done, body), 400)
    for batch in [
        {"seq": giant},
        {"seq": 2**63},
        {"seq": 1_000_001},
        {"seq": -1},
        {"seq": 1, "done": True, "usage": {"prompt_tokens": giant}},
        {"seq": 1, "done": True, "usage": {"completion_tokens": -5}},
    ]:
        body = {"request_id": streamed, "chunks": ["{}"], **batch}
        assert error_of(forge(stack, streamed, body, "/stream"), 400)
    assert {done: snapshot(stack, done), streamed: snapshot(stack, streamed)} == before


# -- streams ------------------------------------------------------------------------------------


def test_a_done_batch_after_the_stream_completed_changes_nothing(stack: Stack) -> None:
    request_id = finished_request(stack, stream=True)
    before = snapshot(stack, request_id)
    view = request_view(stack, request_id)
    last = max(int(row["seq"]) for row in before["chunks"])
    evil = json.dumps(
        {"id": "x", "object": "chat.completion.chunk", "model": MODEL,
         "choices": [{"index": 0, "delta": {"content": " EVIL"}, "finish_reason": None}]}
    )  # fmt: skip
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    for seq, error in [(last + 1, None), (last + 3, None), (last + 1, {"message": "forged"})]:
        body = {
            "request_id": request_id,
            "seq": seq,
            "chunks": [evil],
            "done": True,
            "usage": usage,
            "error": error,
        }
        assert error_of(forge(stack, request_id, body, "/stream"), 409)["type"]
    assert snapshot(stack, request_id) == before
    after = request_view(stack, request_id)
    assert after == view
    assert "EVIL" not in json.dumps(after)


# -- batches ------------------------------------------------------------------------------------


def test_batch_progress_beyond_the_batchs_lines_is_400(stack: Stack) -> None:
    client = stack.client()
    lines = [batch_line(f"slow-{i}", f"[mock:delay=1500] line {i}") for i in range(2)]
    upload = client.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for_batch(client, batch.id, until=lambda b: b.status != "validating")
    url_body = {"batch_id": batch.id, "attempt": 1}
    for forged in [
        {"event": "progress", "completed": 3, "failed": 0, "total": 3},
        {"event": "progress", "completed": 2, "failed": 1, "total": 2},
        {"event": "progress", "completed": -1, "total": 2},
        {"event": "progress", "completed": 10**40, "total": 2},
        {"event": "done", "outcome": "completed", "completed": 2, "total": 2,
         "usage": {"prompt_tokens": -500, "completion_tokens": 3, "total_tokens": -497}},
        {"event": "done", "outcome": "completed", "completed": 2, "total": 2,
         "output": {"lines": 5, "bytes": 10}},
    ]:  # fmt: skip
        response = forge(stack, batch.id, {**url_body, **forged}, "/batch")
        assert error_of(response, 400)["type"] == "invalid_request_error", forged
    ended = wait_for_batch(client, batch.id, until=lambda b: b.status in ENDED)
    assert ended.status == "completed", ended
    assert ended.request_counts is not None
    assert (ended.request_counts.total, ended.request_counts.completed) == (2, 2)


# -- results over the cap -----------------------------------------------------------------------


def test_an_answer_over_the_cap_ends_the_request_failed_with_a_clear_error(
    stack: Stack, pool: ThreadPoolExecutor
) -> None:
    future, request_id = pending_request(stack, pool)
    huge = answer(request_id, prompt_tokens=1, completion_tokens=1)
    huge["body"]["data"] = "x" * (MAX_PAYLOAD_BYTES + 1)
    assert error_of(forge(stack, request_id, huge), 413)["code"] == "payload_too_large"

    response = future.result()
    error = error_of(response, 502)
    assert "limit of" in error["message"] and "bytes" in error["message"]
    assert "x" * 100 not in response.text
    view = request_view(stack, request_id)
    assert view["status"] == "failed" and "limit of" in (view["error"] or "")
    stored = stack.item("requests", request_id)
    assert stored is not None and stored["response_status"] == 502
    time.sleep(2.5)  # the mock's delay: the real answer's callback lands meanwhile, refused
    assert stack.item("requests", request_id) == stored
    assert request_view(stack, request_id) == view
