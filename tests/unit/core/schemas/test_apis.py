"""The Responses and Messages request bodies, and token counts under their names."""

from __future__ import annotations

import pytest

from first_core.errors import InvalidRequestError
from first_core.schemas import MessagesRequest, ResponsesRequest, parse_request
from first_core.schemas.wire import answer_usage

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


def test_responses_body_names_its_max_tokens_max_output_tokens() -> None:
    request = parse_request(
        "responses", {"model": MODEL, "input": "hi", "max_output_tokens": 7, "stream": None}
    )
    assert isinstance(request, ResponsesRequest)
    assert request.max_output_tokens() == 7
    assert request.max_tokens_key == "max_output_tokens"
    assert not request.wants_stream()
    items = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    assert parse_request("responses", {"model": MODEL, "input": items}).max_output_tokens() is None


def test_messages_body_needs_max_tokens() -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
    request = parse_request("messages", {**body, "stream": True, "top_k": 5})
    assert isinstance(request, MessagesRequest)
    assert request.max_output_tokens() == 9 and request.max_tokens_key == "max_tokens"
    assert request.wants_stream()
    del body["max_tokens"]
    with pytest.raises(InvalidRequestError) as refused:
        parse_request("messages", body)
    assert refused.value.param == "max_tokens"


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("responses", {"model": MODEL, "input": "hi"}),
        ("messages", {"model": MODEL, "messages": [{"role": "user"}], "max_tokens": 4}),
    ],
)
def test_unknown_top_level_key_is_refused_by_name(kind: str, body: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        parse_request(kind, {**body, "bogus": 1})  # type: ignore[arg-type]
    assert refused.value.param == "bogus"


def test_input_and_output_tokens_count_as_prompt_and_completion() -> None:
    usage = answer_usage({"usage": {"input_tokens": 11, "output_tokens": 4, "total_tokens": 15}})
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (11, 4)
    anthropic = answer_usage({"usage": {"input_tokens": 3, "output_tokens": 2}})
    assert anthropic is not None and anthropic.total_tokens == 5
    chat = answer_usage({"usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    assert chat is not None and chat.total_tokens == 3
