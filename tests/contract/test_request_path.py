"""The whole non-streaming request path, driven with the real `openai` package over HTTP
against the real local stack (moto server, Globus stand-in, local compute pool, mock vLLM)."""

from __future__ import annotations

import hashlib
import hmac
import json
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from first_local.globus_standin import DEV_IDENTITIES
from tests.conftest import CALLBACK_SECRET
from tests.contract.conftest import Stack

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
BIG_MODEL = "meta-llama/Meta-Llama-3.1-70B-Instruct"
EMBEDDING_MODEL = "Salesforce/SFR-Embedding-Mistral"
SMALL_MODEL = "meta-llama/Llama-3.2-1B-Instruct"  # tight rate limits (test_limits_and_usage)
MESSAGES = [{"role": "user", "content": "What does FIRST stand for?"}]


def direct(stack: Stack) -> openai.OpenAI:
    """The mock vLLM itself, to compare the gateway's answers with."""
    return openai.OpenAI(base_url=stack.state["backend_url"], api_key="unused", max_retries=0)


def callback_token(request_id: str) -> str:
    return hmac.new(CALLBACK_SECRET.encode(), request_id.encode(), hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    ("federated", "cluster"), [(True, "sophia"), (False, "sophia"), (False, "polaris")]
)
def test_chat_answer_is_the_backends_answer(stack: Stack, federated: bool, cluster: str) -> None:
    raw = stack.client(
        federated=federated, cluster=cluster
    ).chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=24)
    reply = raw.parse()
    expected = direct(stack).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert reply.choices[0].finish_reason == expected.choices[0].finish_reason
    assert reply.usage == expected.usage
    assert raw.headers["x-first-request-id"].startswith("req_")
    if not federated:
        assert raw.headers["x-first-cluster"] == cluster


def test_usage_and_owner_are_on_the_request_record(stack: Stack) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model=BIG_MODEL, messages=MESSAGES
    )
    reply = raw.parse()
    item = stack.table("requests").get_item(
        Key={"request_id": raw.headers["x-first-request-id"]}, ConsistentRead=True
    )["Item"]
    assert item["status"] == "completed"
    assert item["user_id"] == DEV_IDENTITIES["alice"].sub
    assert item["cluster"] == "sophia"  # the only cluster that serves the 70B model
    # (Its task id is written only if the answer is slow: test_recovery's lost callbacks.)
    assert reply.usage is not None
    assert item["prompt_tokens"] == Decimal(reply.usage.prompt_tokens)
    assert item["completion_tokens"] == Decimal(reply.usage.completion_tokens)
    assert item["total_tokens"] == Decimal(reply.usage.total_tokens)
    # The answer is on the record, written by the callback's update that ended it; no result
    # row (issue 19: six writes a request).
    assert item["response_status"] == 200
    assert json.loads(item["response_body"])["choices"][0]["message"]["content"] == (
        reply.choices[0].message.content
    )
    assert stack.item("results", item["request_id"]) is None


@pytest.mark.parametrize("federated", [True, False])
def test_completions(stack: Stack, federated: bool) -> None:
    reply = stack.client(federated=federated).completions.create(
        model=MODEL, prompt=["Once upon a time", "In a galaxy"], max_tokens=10
    )
    expected = direct(stack).completions.create(
        model=MODEL, prompt=["Once upon a time", "In a galaxy"], max_tokens=10
    )
    assert reply.object == "text_completion"
    assert [c.text for c in reply.choices] == [c.text for c in expected.choices]
    assert reply.usage == expected.usage


@pytest.mark.parametrize("options", [{}, {"encoding_format": "float"}])
def test_embeddings(stack: Stack, options: dict[str, Any]) -> None:
    # Without options the SDK asks for base64 and decodes it; both must give the same numbers.
    inputs = ["protein folding", "plasma physics", "climate"]
    reply = stack.client().embeddings.create(model=EMBEDDING_MODEL, input=inputs, **options)
    expected = direct(stack).embeddings.create(model=EMBEDDING_MODEL, input=inputs)
    assert [d.index for d in reply.data] == [0, 1, 2]
    assert [d.embedding for d in reply.data] == [d.embedding for d in expected.data]
    assert len(reply.data[0].embedding) == 4096


def test_models_federated_and_per_cluster(stack: Stack) -> None:
    everywhere = {m.id for m in stack.client().models.list()}
    # ... and the local direct backend's (tests/contract/test_direct.py).
    assert everywhere == {MODEL, BIG_MODEL, EMBEDDING_MODEL, SMALL_MODEL, "openai/gpt-oss-20b"}
    polaris = {m.id for m in stack.client(federated=False, cluster="polaris").models.list()}
    assert polaris == {MODEL, SMALL_MODEL}


def test_whoami_and_health(stack: Stack) -> None:
    from first_local.globus_standin import ALLOWED_GROUP_ID, mint_token

    me = httpx.get(
        f"{stack.base_url}/resource_server/v1/whoami",
        headers={"Authorization": f"Bearer {mint_token('alice')}"},
    ).json()
    assert me["username"] == "alice@anl.gov"
    assert me["identity_provider"]["domain"] == "anl.gov"
    assert me["groups"] == [ALLOWED_GROUP_ID]
    health = httpx.get(f"{stack.base_url}/health")
    assert health.status_code == 200
    clusters = health.json()["clusters"]
    assert clusters == {"sophia": "online", "polaris": "online", "direct": "online"}


# -- errors the OpenAI SDK understands ------------------------------------------------------


def assert_openai_shaped(error: openai.APIStatusError) -> dict[str, Any]:
    body = error.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return dict(body["error"])


def test_missing_token_is_401(stack: Stack) -> None:
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json={"model": MODEL})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("token", "said"),
    [
        ("Ag" + "0" * 60, "inactive or expired"),  # the shape of a token: Globus refuses it
        ("not-a-token", "malformed"),  # not even the shape: refused before Globus (issue 15)
    ],
)
def test_bad_token_is_authentication_error(stack: Stack, token: str, said: str) -> None:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=token, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert said in assert_openai_shaped(raised.value)["message"]


def test_expired_token_is_authentication_error(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        stack.client("alice", expired=True).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert "expired" in assert_openai_shaped(raised.value)["message"]


def test_identity_provider_not_allowed_names_the_allowed_ones(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        stack.client("carol").chat.completions.create(model=MODEL, messages=MESSAGES)
    message = assert_openai_shaped(raised.value)["message"]
    assert "example.org" in message
    assert "anl.gov" in message and "uchicago.edu" in message


def test_user_outside_allowed_groups_is_permission_denied(stack: Stack) -> None:
    with pytest.raises(openai.PermissionDeniedError) as raised:
        stack.client("bob").chat.completions.create(model=MODEL, messages=MESSAGES)
    assert "bob@uchicago.edu" in assert_openai_shaped(raised.value)["message"]
    with pytest.raises(openai.PermissionDeniedError):
        stack.client("bob").models.list()


def test_unknown_model_and_cluster_are_not_found(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        stack.client().chat.completions.create(model="gpt-17", messages=MESSAGES)
    assert assert_openai_shaped(raised.value)["param"] == "model"
    with pytest.raises(openai.NotFoundError) as raised:
        stack.client(federated=False, cluster="polaris").chat.completions.create(
            model=BIG_MODEL, messages=MESSAGES
        )
    assert "polaris" in assert_openai_shaped(raised.value)["message"]
    with pytest.raises(openai.NotFoundError) as raised:
        stack.client(federated=False, cluster="nowhere").chat.completions.create(
            model=MODEL, messages=MESSAGES
        )
    assert assert_openai_shaped(raised.value)["param"] == "cluster"


def test_invalid_body_is_bad_request_naming_the_field(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        stack.client().chat.completions.create(model=MODEL, messages=MESSAGES, temperature=7)
    error = assert_openai_shaped(raised.value)
    assert error["param"] == "temperature"
    assert "temperature" in error["message"]


def test_max_tokens_over_the_models_cap_is_bad_request(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        stack.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100_000)
    assert assert_openai_shaped(raised.value)["param"] == "max_tokens"


def test_backend_failure_is_a_server_error_and_the_record_says_failed(stack: Stack) -> None:
    client = stack.client()
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi [mock:error]"}]
        )
    assert raised.value.status_code == 502
    assert_openai_shaped(raised.value)


def test_compute_timeout_is_504_with_the_request_id(stack: Stack) -> None:
    slow = [{"role": "user", "content": "take your time [mock:delay=6000]"}]
    with pytest.raises(openai.APIStatusError) as raised:
        stack.client().chat.completions.create(model=MODEL, messages=slow)
    assert raised.value.status_code == 504
    message = assert_openai_shaped(raised.value)["message"]
    request_id = raised.value.response.headers.get("x-first-request-id")
    assert request_id and request_id in message


# -- callbacks --------------------------------------------------------------------------------


def completed_request(stack: Stack) -> str:
    raw = stack.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=5
    )
    return str(raw.headers["x-first-request-id"])


def post_callback(
    stack: Stack, request_id: str, token: str, body: dict[str, Any]
) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/callbacks/{request_id}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    )


def test_forged_and_cross_request_callbacks_are_refused_and_write_nothing(stack: Stack) -> None:
    done = completed_request(stack)
    other = completed_request(stack)
    before = stack.item("requests", done)
    forged = {"request_id": done, "status_code": 200, "body": {"choices": [], "usage": None}}
    real = callback_token(done)
    one_digit_off = real[:-1] + ("1" if real[-1] == "0" else "0")
    for token in ["0" * 64, callback_token(other), "x", one_digit_off]:
        response = post_callback(stack, done, token, forged)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert stack.item("requests", done) == before
    # A request id that was never issued: a valid-looking signature for it still writes nothing.
    ghost = "req_" + "f" * 32
    response = post_callback(stack, ghost, callback_token(ghost), {**forged, "request_id": ghost})
    assert response.status_code == 409
    assert stack.item("requests", ghost) is None


def test_replayed_callback_changes_nothing(stack: Stack) -> None:
    done = completed_request(stack)
    record_before = stack.item("requests", done)
    replay = {
        "request_id": done,
        "status_code": 200,
        # Within the request's bounds (max_tokens 5): out-of-range usage is refused before the
        # replay meets the ended request (test_hardening_callbacks.py).
        "body": {"usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}},
    }
    response = post_callback(stack, done, callback_token(done), replay)
    assert response.status_code == 200
    assert response.json() == {"accepted": False, "duplicate": True}
    assert stack.item("requests", done) == record_before


def test_a_body_over_the_payload_cap_is_refused_before_anything_is_recorded(stack: Stack) -> None:
    huge = "x" * (10 * 1024 * 1024 + 1)  # the default cap is 10 MB
    with pytest.raises(openai.APIStatusError) as raised:
        stack.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": huge}]
        )
    assert raised.value.status_code == 413
    error = assert_openai_shaped(raised.value)
    assert error["code"] == "payload_too_large"
    assert "limit" in error["message"]
    assert "x-first-request-id" not in raised.value.response.headers
