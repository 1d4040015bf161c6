"""The Responses API and Anthropic's Messages API through the gateway, with the real `openai` and
`anthropic` packages against the real local stack (the mock vLLM serves both, as vLLM does)."""

from __future__ import annotations

import httpx
import openai
import pytest

from first_local.globus_standin import mint_token
from tests.contract.conftest import Stack
from tests.support.contract import usage_rows, wait_until_ended

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
PROMPT = "Name three things a scheduler does."


def direct(stack: Stack) -> openai.OpenAI:
    """The mock vLLM itself, to compare the gateway's answers with."""
    return openai.OpenAI(base_url=stack.state["backend_url"], api_key="unused", max_retries=0)


def one_usage(stack: Stack, request_id: str) -> dict[str, object]:
    wait_until_ended(stack, request_id)
    rows = usage_rows(stack, request_id)
    assert len(rows) == 1, rows
    return rows[0]


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
        client.responses.create(model=MODEL, input=PROMPT, max_output_tokens=10**7)
    assert "max_output_tokens" in str(refused.value)


def test_responses_unknown_key_is_refused_by_name(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        stack.client().responses.create(
            model=MODEL, input=PROMPT, extra_body={"no_such_option": 1}
        )
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
