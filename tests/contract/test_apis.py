"""The Responses API and Anthropic's Messages API through the gateway, with the real `openai` and
`anthropic` packages against the real local stack (the mock vLLM serves both, as vLLM does)."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import pytest

from first_local.globus_standin import mint_token
from tests.contract.conftest import Stack
from tests.support.contract import the_usage_row, wait_until_ended

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
PROMPT = "Name three things a scheduler does."


def direct(stack: Stack) -> openai.OpenAI:
    """The mock vLLM itself, to compare the gateway's answers with."""
    return openai.OpenAI(base_url=stack.state["backend_url"], api_key="unused", max_retries=0)


def one_usage(stack: Stack, request_id: str) -> dict[str, object]:
    return the_usage_row(stack, request_id)


# ---- Responses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("federated", [True, False])
def test_responses_create_is_the_backends_answer(stack: Stack, federated: bool) -> None:
    client = stack.client(federated=federated)
    raw = client.responses.with_raw_response.create(model=MODEL, input=PROMPT)
    response = raw.parse()
    expected = direct(stack).responses.create(model=MODEL, input=PROMPT)
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text and response.output_text == expected.output_text
    assert response.usage is not None and response.usage.output_tokens > 0
    request_id = raw.headers["x-first-request-id"]
    row = one_usage(stack, request_id)
    assert int(row["prompt_tokens"]) == response.usage.input_tokens
    assert int(row["completion_tokens"]) == response.usage.output_tokens
    # The gateway filled in the endpoint's cap under the Responses API's own name.
    assert int(stack.item("requests", request_id)["max_tokens"]) >= response.usage.output_tokens


def test_responses_max_output_tokens_is_honoured_and_capped(stack: Stack) -> None:
    client = stack.client()
    short = client.responses.create(
        model=MODEL, input=PROMPT + " [mock:tokens=40]", max_output_tokens=5
    )
    assert short.status == "incomplete"
    assert short.usage is not None and short.usage.output_tokens == 5
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input=PROMPT, max_output_tokens=9000)  # cap: 8192
    assert "max_output_tokens" in str(refused.value)


def test_responses_unknown_key_is_refused_by_name(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        stack.client().responses.create(model=MODEL, input=PROMPT, extra_body={"no_such_option": 1})
    assert "no_such_option" in str(refused.value)


def test_get_response_by_request_id_for_its_owner(stack: Stack) -> None:
    raw = stack.client().responses.with_raw_response.create(model=MODEL, input=PROMPT)
    request_id = raw.headers["x-first-request-id"]
    wait_until_ended(stack, request_id)
    url = f"{stack.base_url}/v1/responses/{request_id}"
    mine = httpx.get(url, headers={"Authorization": f"Bearer {mint_token('alice')}"})
    assert mine.status_code == 200, mine.text
    assert mine.json()["id"] == raw.parse().id
    theirs = httpx.get(url, headers={"Authorization": f"Bearer {mint_token('dave')}"})
    assert theirs.status_code == 404


# ---- Anthropic Messages -----------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": PROMPT}]


def claude(stack: Stack, user: str = "alice", *, federated: bool = True, **auth: str) -> Any:
    """An `anthropic.Anthropic` client on the gateway; the Globus token as `auth_token`
    (Authorization: Bearer) unless `auth` says otherwise (`api_key=`: x-api-key)."""
    base = stack.base_url if federated else f"{stack.base_url}/resource_server/v1/sophia/vllm"
    return anthropic.Anthropic(
        base_url=base, max_retries=0, **(auth or {"auth_token": mint_token(user)})
    )


def claude_direct(stack: Stack) -> Any:
    return anthropic.Anthropic(
        base_url=stack.state["backend_url"].removesuffix("/v1"), api_key="unused", max_retries=0
    )


@pytest.mark.parametrize(
    ("federated", "auth"), [(True, "auth_token"), (False, "auth_token"), (True, "api_key")]
)
def test_messages_create_is_the_backends_answer(stack: Stack, federated: bool, auth: str) -> None:
    client = claude(stack, federated=federated, **{auth: mint_token("alice")})
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=64, messages=MESSAGES, system="Be brief."
    )
    message = raw.parse()
    expected = claude_direct(stack).messages.create(
        model=MODEL, max_tokens=64, messages=MESSAGES, system="Be brief."
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].text == expected.content[0].text
    assert message.stop_reason == "end_turn"
    row = one_usage(stack, raw.headers["x-first-request-id"])
    assert int(row["prompt_tokens"]) == message.usage.input_tokens
    assert int(row["completion_tokens"]) == message.usage.output_tokens > 0


def test_messages_errors_are_anthropic_shaped(stack: Stack) -> None:
    client = claude(stack)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no/such-model", max_tokens=8, messages=MESSAGES)
    assert missing.value.body["type"] == "error"
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as too_many:
        client.messages.create(model=MODEL, max_tokens=9000, messages=MESSAGES)  # cap: 8192
    assert too_many.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in too_many.value.body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError) as refused:
        claude(stack, api_key="not-a-token").messages.create(
            model=MODEL, max_tokens=8, messages=MESSAGES
        )
    assert refused.value.body["error"]["type"] == "authentication_error"
    # Only this route speaks Anthropic's shape: chat keeps OpenAI's.
    with pytest.raises(openai.NotFoundError) as chat_missing:
        stack.client().chat.completions.create(model="no/such-model", messages=MESSAGES)
    assert chat_missing.value.body["type"] != "error"  # type: ignore[index]


def test_x_api_key_counts_only_on_the_messages_route(stack: Stack) -> None:
    token = mint_token("alice")
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8}
    chat = httpx.post(
        f"{stack.base_url}/v1/chat/completions", json=body, headers={"x-api-key": token}
    )
    assert chat.status_code == 401
    messages = httpx.post(f"{stack.base_url}/v1/messages", json=body, headers={"x-api-key": token})
    assert messages.status_code == 200, messages.text


# ---- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("federated", [True, False])
def test_responses_stream_events_in_order(stack: Stack, federated: bool) -> None:
    client = stack.client(federated=federated)
    whole = client.responses.create(model=MODEL, input=PROMPT)
    raw = client.responses.with_raw_response.create(model=MODEL, input=PROMPT, stream=True)
    request_id = raw.headers["x-first-request-id"]
    events = list(raw.parse())
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text
    assert kinds.index("response.output_text.delta") < kinds.index("response.output_text.done")
    completed = events[-1].response
    assert completed.output_text == whole.output_text
    row = one_usage(stack, request_id)
    assert completed.usage is not None
    assert int(row["prompt_tokens"]) == completed.usage.input_tokens
    assert int(row["completion_tokens"]) == completed.usage.output_tokens == len(deltas)
    # The assembled answer of the stream is its final response.
    stored = httpx.get(
        f"{stack.base_url}/v1/responses/{request_id}",
        headers={"Authorization": f"Bearer {mint_token('alice')}"},
    )
    assert stored.status_code == 200 and stored.json()["id"] == completed.id


def test_responses_raw_stream_names_every_event_and_has_no_done(stack: Stack) -> None:
    body = {"model": MODEL, "input": PROMPT, "stream": True}
    with httpx.stream(
        "POST",
        f"{stack.base_url}/v1/responses",
        json=body,
        headers={"Authorization": f"Bearer {mint_token('alice')}"},
    ) as response:
        text = response.read().decode()
    assert response.status_code == 200
    events = [e for e in text.split("\n\n") if e.strip() and not e.startswith(":")]
    for event in events:
        name, data = event.split("\n", 1)
        assert name.startswith("event: response.") and data.startswith("data: {")
        assert f'"type":"{name.removeprefix("event: ")}"' in data
    assert "[DONE]" not in text


@pytest.mark.parametrize("auth", ["auth_token", "api_key"])
def test_messages_stream_text_equals_the_whole_answer(stack: Stack, auth: str) -> None:
    client = claude(stack, **{auth: mint_token("alice")})
    whole = client.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    with client.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as stream:
        request_id = stream.response.headers["x-first-request-id"]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens
    row = one_usage(stack, request_id)
    assert int(row["prompt_tokens"]) == final.usage.input_tokens
    assert int(row["completion_tokens"]) == final.usage.output_tokens
    # GET /v1/requests/{id} rebuilds the message from the stored events.
    view = httpx.get(
        f"{stack.base_url}/v1/requests/{request_id}",
        headers={"Authorization": f"Bearer {mint_token('alice')}"},
    ).json()
    assert view["response"]["content"] == [{"type": "text", "text": text}]
    assert view["response"]["stop_reason"] == "end_turn"


def test_messages_stream_failure_is_an_anthropic_error(stack: Stack) -> None:
    client = claude(stack)
    failing = [{"role": "user", "content": PROMPT + " [mock:error-after=3]"}]
    with (
        pytest.raises(anthropic.APIStatusError) as failed,
        client.messages.stream(model=MODEL, max_tokens=64, messages=failing) as stream,
    ):
        "".join(stream.text_stream)
    assert failed.value.body["type"] == "error"  # type: ignore[index]
    with (
        pytest.raises(anthropic.NotFoundError),
        client.messages.stream(model="no/such-model", max_tokens=8, messages=MESSAGES),
    ):
        pass
