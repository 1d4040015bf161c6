"""Every request fixture of the reference FIRST gateway, sent over HTTP with the real `openai`
package: valid bodies are answered, invalid ones are refused with 400 naming the field."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.conftest import FIRST_FIXTURES
from tests.contract.conftest import Stack

SERVED = {
    "chat/completions": "meta-llama/Meta-Llama-3-8B-Instruct",
    "completions": "meta-llama/Meta-Llama-3-8B-Instruct",
    "embeddings": "Salesforce/SFR-Embedding-Mistral",
}
FILES = {
    "chat/completions": "chat_completions",
    "completions": "completions",
    "embeddings": "embeddings",
}


def cases(validity: str) -> list[Any]:
    params = []
    for path, stem in FILES.items():
        bodies = json.loads((FIRST_FIXTURES / f"{validity}_{stem}.json").read_text())
        params += [pytest.param(path, body, id=f"{stem}-{i}") for i, body in enumerate(bodies)]
    return params


@pytest.mark.parametrize(("path", "body"), cases("valid"))
def test_valid_fixture_is_answered(stack: Stack, path: str, body: dict[str, Any]) -> None:
    # The fixtures name models this stack may not serve; validation is what they test.
    body = {**body, "model": SERVED[path]}
    client = stack.client()
    if body.get("stream"):
        stream = client.post(
            f"/{path}", body=body, cast_to=object, stream=True, stream_cls=openai.Stream[object]
        )
        chunks = list(stream)
        assert chunks, "a valid streamed request yields chunks"
        return
    reply = client.post(f"/{path}", body=body, cast_to=object)
    assert isinstance(reply, dict)
    assert reply["object"] in {"chat.completion", "text_completion", "list"}


@pytest.mark.parametrize(("path", "body"), cases("invalid"))
def test_invalid_fixture_is_refused_naming_the_field(
    stack: Stack, path: str, body: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        stack.client().post(f"/{path}", body=body, cast_to=object)
    error = raised.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"], error
    assert error["param"].split(".")[0] in error["message"]
