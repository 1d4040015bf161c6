"""The non-streamed inference compute function against the mock vLLM and a recording callback,
over sockets: what it posts back, and a filled-in max_tokens fitted to the model's context."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from compute_funcs.inference import vllm_inference
from first_local.mock_vllm import MockConfig, create_app
from tests.support.asgi import serve

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"  # 8,192 tokens of context in the mock


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """The mock vLLM and a callback receiver recording every result posted to it."""
    posted: list[dict[str, Any]] = []

    async def callback(request: Request) -> Response:
        posted.append(json.loads(await request.body()))
        return JSONResponse({"ok": True})

    receiver = Starlette(routes=[Route("/cb", callback, methods=["POST"])])
    with serve(create_app(MockConfig())) as vllm, serve(receiver) as callbacks:
        yield f"{vllm}/v1|{callbacks}/cb", posted


def run(servers: tuple[str, list[dict[str, Any]]], **kwargs: Any) -> dict[str, Any]:
    vllm, callback = servers[0].split("|")
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi [mock:tokens=5]"}]}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_BASE_URL", vllm)
        return vllm_inference(
            {**payload, "max_tokens": 8192}, "chat/completions", "req_t", callback, "tok", **kwargs
        )


def test_a_fitted_max_tokens_is_lowered_to_the_room_in_the_context(
    servers: tuple[str, list[dict[str, Any]]],
) -> None:
    result = run(servers, fitted_max_tokens=True)

    assert result["status_code"] == 200
    assert result["body"]["usage"]["completion_tokens"] == 5
    assert servers[1][-1] == result  # and the callback got the same answer


def test_a_max_tokens_the_caller_named_is_refused_by_vllm_as_it_is(
    servers: tuple[str, list[dict[str, Any]]],
) -> None:
    result = run(servers)

    assert result["status_code"] == 400
    assert "maximum context length is 8192" in result["body"]["error"]["message"]
