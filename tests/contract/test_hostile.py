"""Hostile callers: forged, replayed, oversized and malformed callbacks on both callback routes
write nothing; and the object-id route answers 404 to anyone but the owner, the same 404 as for
an id that was never issued."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import pytest

from first_local.globus_standin import mint_token
from tests.conftest import CALLBACK_SECRET
from tests.contract.conftest import Stack
from tests.support.contract import snapshot, usage_rows

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
MESSAGES = [{"role": "user", "content": "Say something hostile."}]
MAX_PAYLOAD_BYTES = 10 * 1024 * 1024  # settings.max_payload_bytes (default)
INLINE_RESULT_BYTES = 300_000  # settings.inline_result_bytes (default): a stream batch's cap


def callback_token(request_id: str) -> str:
    return hmac.new(CALLBACK_SECRET.encode(), request_id.encode(), hashlib.sha256).hexdigest()


def finished_request(stack: Stack, *, stream: bool) -> str:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "stream": stream}
    with httpx.stream(
        "POST",
        f"{stack.base_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {mint_token('alice')}"},
        timeout=30,
    ) as response:
        response.read()
        assert response.status_code == 200, response.text
        request_id = str(response.headers["x-first-request-id"])
    # A stream's client may see its end a moment before the request record and usage row are.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        record = stack.item("requests", request_id) or {}
        if record.get("status") == "completed" and len(usage_rows(stack, request_id)) == 1:
            return request_id
        time.sleep(0.05)
    raise AssertionError(f"{request_id} did not end: {stack.item('requests', request_id)}")






def post(
    stack: Stack,
    request_id: str,
    *,
    stream: bool,
    content: bytes,
    authorization: str | None,
) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    path = f"/callbacks/{request_id}" + ("/stream" if stream else "")
    return httpx.post(f"{stack.base_url}{path}", content=content, headers=headers, timeout=60)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return dict(body["error"])


def callback_body(request_id: str, *, stream: bool, evil: str = "evil") -> dict[str, Any]:
    # Within the request's bounds (max_tokens 5), so a replay meets the ended request itself;
    # out-of-range usage is refused before that (test_hardening_callbacks.py).
    usage = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    if stream:
        return {"request_id": request_id, "seq": 0, "chunks": [evil], "done": True, "usage": usage}
    return {
        "request_id": request_id,
        "status_code": 200,
        "body": {"choices": [{"message": {"content": evil}}], "usage": usage},
    }


@pytest.fixture(params=[False, True], ids=["result", "stream"])
def stream(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_wrong_and_cross_request_tokens_are_refused(stack: Stack, stream: bool) -> None:
    done = finished_request(stack, stream=stream)
    other = finished_request(stack, stream=stream)
    before = snapshot(stack, done)
    body = json.dumps(callback_body(done, stream=stream)).encode()
    real = callback_token(done)
    for authorization in [
        None,
        "",
        "Bearer",
        f"Basic {real}",
        f"Bearer {'0' * 64}",
        f"Bearer {callback_token(other)}",
        f"Bearer {real[:-1]}",
        f"Bearer {real.upper()}",
        f"Bearer {mint_token('alice')}",  # a user token is no callback token
    ]:
        response = post(stack, done, stream=stream, content=body, authorization=authorization)
        assert error_of(response, 401)["type"] == "authentication_error"
    # Another request's token on its own route, with a body naming this one: still refused.
    response = post(
        stack, other, stream=stream, content=body, authorization=f"Bearer {callback_token(other)}"
    )
    assert error_of(response, 400)["param"] == "request_id"
    assert snapshot(stack, done) == before


def test_replay_after_completion_changes_nothing(stack: Stack, stream: bool) -> None:
    done = finished_request(stack, stream=stream)
    before = snapshot(stack, done)
    assert len(before["usage"]) == 1
    body = json.dumps(callback_body(done, stream=stream)).encode()
    for _ in range(2):
        response = post(
            stack, done, stream=stream, content=body, authorization=f"Bearer {callback_token(done)}"
        )
        if response.status_code >= 400:
            assert error_of(response, 409)  # refused: already ended
        else:
            assert response.json().get("duplicate") is True
    after = snapshot(stack, done)
    assert after == before
    assert len(after["usage"]) == 1


def test_oversized_body_is_413_and_writes_nothing(stack: Stack, stream: bool) -> None:
    done = finished_request(stack, stream=stream)
    before = snapshot(stack, done)
    cap = INLINE_RESULT_BYTES if stream else MAX_PAYLOAD_BYTES
    body = callback_body(done, stream=stream, evil="x" * (cap + 1))
    response = post(
        stack,
        done,
        stream=stream,
        content=json.dumps(body).encode(),
        authorization=f"Bearer {callback_token(done)}",
    )
    assert error_of(response, 413)["code"] == "payload_too_large"
    assert snapshot(stack, done) == before


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"not json", b"[]", b"null", b'{"request_id": 7}', b"\xff\xfe", b'{"seq": -1}'],
)
def test_malformed_json_is_400_and_writes_nothing(
    stack: Stack, stream: bool, content: bytes
) -> None:
    ghost = "req_" + hashlib.sha256(content + bytes([stream])).hexdigest()[:32]  # never issued
    response = post(
        stack,
        ghost,
        stream=stream,
        content=content,
        authorization=f"Bearer {callback_token(ghost)}",
    )
    assert error_of(response, 400)["type"] == "invalid_request_error"
    assert snapshot(stack, ghost) == {"request": None, "chunks": [], "usage": []}


def test_malformed_json_on_a_finished_request_writes_nothing(stack: Stack, stream: bool) -> None:
    done = finished_request(stack, stream=stream)
    before = snapshot(stack, done)
    for content in [b"{", b'{"request_id": "' + done.encode() + b'", "seq": "x"}', b"[1, 2]"]:
        response = post(
            stack,
            done,
            stream=stream,
            content=content,
            authorization=f"Bearer {callback_token(done)}",
        )
        error_of(response, 400)
    assert snapshot(stack, done) == before


def test_a_body_naming_another_request_is_refused(stack: Stack, stream: bool) -> None:
    done = finished_request(stack, stream=stream)
    other = finished_request(stack, stream=stream)
    before = {done: snapshot(stack, done), other: snapshot(stack, other)}
    response = post(
        stack,
        done,
        stream=stream,
        content=json.dumps(callback_body(other, stream=stream)).encode(),
        authorization=f"Bearer {callback_token(done)}",
    )
    assert error_of(response, 400)["param"] == "request_id"
    assert {done: snapshot(stack, done), other: snapshot(stack, other)} == before


# -- object ids -------------------------------------------------------------------------------


def get_request(stack: Stack, request_id: str, user: str) -> httpx.Response:
    return httpx.get(
        f"{stack.base_url}/v1/requests/{request_id}",
        headers={"Authorization": f"Bearer {mint_token(user)}"},
    )


def test_requests_are_404_to_anyone_but_the_owner(stack: Stack) -> None:
    mine = finished_request(stack, stream=False)
    made_up = "req_" + "0123456789abcdef" * 2
    owner = get_request(stack, mine, "alice")
    assert owner.status_code == 200
    assert owner.json()["id"] == mine and owner.json()["status"] == "completed"

    def anonymous(response: httpx.Response, request_id: str) -> str:
        error_of(response, 404)
        return response.text.replace(request_id, "<id>")

    # Another served user (even an admin) gets the same 404 as the owner does for a made-up id.
    for user in ["dave"]:
        assert anonymous(get_request(stack, mine, user), mine) == anonymous(
            get_request(stack, made_up, "alice"), made_up
        )
        assert get_request(stack, made_up, user).text == get_request(stack, made_up, "alice").text
    # Refused users are refused before any lookup: the same answer, existing or not.
    assert get_request(stack, mine, "bob").status_code == 403
    assert get_request(stack, mine, "bob").text.replace(mine, "<id>") == get_request(
        stack, made_up, "bob"
    ).text.replace(made_up, "<id>")
    no_token = httpx.get(f"{stack.base_url}/v1/requests/{mine}")
    assert error_of(no_token, 401)["type"] == "authentication_error"
    # Another user's id that looks like a path trick is still just an unknown id.
    for odd in ["..%2F" + mine, mine + "%00", mine.upper()]:
        assert get_request(stack, odd, "alice").status_code == 404
