"""Request validation against the reference FIRST gateway's fixtures and the official SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from pydantic import BaseModel

from first_core.errors import InvalidRequestError
from first_core.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    FirstBatchRequest,
    Kind,
    parse_request,
)
from tests.conftest import PROJECT_ROOT

# The fixtures live beside the project (../shared), shared with other implementations.
FIXTURES = PROJECT_ROOT.parent / "shared" / "conformance" / "first-fixtures"

KINDS: dict[str, Kind] = {
    "chat_completions": "chat/completions",
    "completions": "completions",
    "embeddings": "embeddings",
    "batch": "batches",
}
EXPECTED_COUNTS = {
    "valid_chat_completions.json": 41,
    "invalid_chat_completions.json": 118,
    "valid_completions.json": 16,
    "invalid_completions.json": 53,
    "valid_embeddings.json": 9,
    "invalid_embeddings.json": 13,
    "valid_batch.json": 2,
    "invalid_batch.json": 8,
}


def _load(name: str) -> list[dict[str, Any]]:
    cases = json.loads((FIXTURES / name).read_text())
    assert isinstance(cases, list)
    return cases


def _cases(prefix: str) -> list[Any]:
    return [
        pytest.param(kind, body, id=f"{prefix}_{stem}-{i}")
        for stem, kind in KINDS.items()
        for i, body in enumerate(_load(f"{prefix}_{stem}.json"))
    ]


def _walk(body: Any, parts: list[str]) -> Any:
    """The value at a dotted path; fails the test if the path is not in the body."""
    node = body
    for part in parts:
        if isinstance(node, list):
            assert part.isdigit() and int(part) < len(node), f"no index {part} in {node!r}"
            node = node[int(part)]
        else:
            assert isinstance(node, dict) and part in node, f"no key {part!r} in {node!r}"
            node = node[part]
    return node


def _refusal(kind: Kind, body: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(kind, body)
    return info.value


@pytest.mark.parametrize(("name", "count"), EXPECTED_COUNTS.items())
def test_fixture_files_are_complete(name: str, count: int) -> None:
    assert len(_load(name)) == count


@pytest.mark.parametrize(("kind", "body"), _cases("valid"))
def test_valid_fixture_is_accepted(kind: Kind, body: dict[str, Any]) -> None:
    for raw in (body, json.dumps(body), json.dumps(body).encode()):
        parsed = parse_request(kind, raw)
        assert parsed.model == body["model"]


@pytest.mark.parametrize(("kind", "body"), _cases("invalid"))
def test_invalid_fixture_is_refused_naming_the_field(kind: Kind, body: dict[str, Any]) -> None:
    err = _refusal(kind, json.dumps(body))
    assert err.param, err.message
    assert err.param in err.message
    assert err.code in {
        "invalid_type",
        "invalid_value",
        "missing_required_parameter",
        "unknown_parameter",
    }
    for leak in ("pydantic", "http", "Input should", "[key]", "§"):
        assert leak not in err.message
    *parents, last = err.param.split(".")
    parent = _walk(body, parents)
    if err.code == "missing_required_parameter":
        assert isinstance(parent, dict) and last not in parent
    else:  # an unknown key, or a value that is wrong: either way it is in the body
        _walk(parent, [last])


# ---- messages, params and codes ----------------------------------------------------------------

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("extra", "param", "code", "message"),
    [
        (
            {"temperature": 3.5},
            "temperature",
            "invalid_value",
            "Invalid value for 'temperature': must be at most 2 (got 3.5).",
        ),
        (
            {"random-extra-key": 1},
            "random-extra-key",
            "unknown_parameter",
            "Unrecognized request argument supplied: random-extra-key",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            "messages.0.content.0.text",
            "invalid_type",
            "Invalid type for 'messages.0.content.0.text': expected a string, but got an integer.",
        ),
        (
            {"max_tokens": 10.5},
            "max_tokens",
            "invalid_type",
            "Invalid type for 'max_tokens': expected an integer, but got a decimal number.",
        ),
        (
            {"stop": ["a", "b", "c", "d", "e"]},
            "stop",
            "invalid_value",
            "Invalid value for 'stop': must have at most 4 items (got 5 items).",
        ),
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            "messages.0.role",
            "invalid_value",
            "Invalid value for 'messages.0.role': must be one of 'system', 'developer', "
            "'user', 'assistant', 'tool' (got \"robot\").",
        ),
        (
            {"logprobs": False, "top_logprobs": 2},
            "top_logprobs",
            "invalid_value",
            "Invalid value for 'top_logprobs': 'logprobs' must be true when 'top_logprobs' is set.",
        ),
        (
            {"logit_bias": {"hello": 1}},
            "logit_bias",
            "invalid_value",
            "Invalid key in 'logit_bias': keys must be token ids (non-negative integers) "
            '(got "hello").',
        ),
    ],
    ids=["range", "unknown", "nested-type", "integer", "stop", "role", "top_logprobs", "key"],
)
def test_error_names_the_field(extra: dict[str, Any], param: str, code: str, message: str) -> None:
    err = _refusal("chat/completions", {**CHAT, **extra})
    assert (err.param, err.code, err.message) == (param, code, message)
    assert err.to_body()["error"] == {
        "message": message,
        "type": "invalid_request_error",
        "param": param,
        "code": code,
    }


def test_missing_required_parameter() -> None:
    err = _refusal("chat/completions", {"model": "m"})
    assert (err.param, err.code) == ("messages", "missing_required_parameter")
    assert err.message == "Missing required parameter: 'messages'."


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "The request body is not valid JSON."),
        (b"\xff\xfe\x00", "The request body is not valid JSON."),
        ("", "The request body is not valid JSON."),
        ("[" * 100_000, "The request body is not valid JSON."),
        (b'[{"model": "m"}]', "The request body must be a JSON object."),
        ('"just a string"', "The request body must be a JSON object."),
        (b"null", "The request body must be a JSON object."),
        # Already parsed (inference.submit parses once and passes the result on).
        (None, "The request body must be a JSON object."),
        (7, "The request body must be a JSON object."),
    ],
)
def test_body_that_is_not_a_json_object(body: object, message: str) -> None:
    err = _refusal("chat/completions", body)
    assert (err.param, err.code, err.message) == (None, "invalid_json", message)


@pytest.mark.parametrize(
    "raw",
    ['{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'],
)
def test_non_finite_numbers_are_refused(raw: str) -> None:
    assert _refusal("chat/completions", raw).param == "temperature"


def test_types_are_strict() -> None:
    # Lax pydantic would take these; OpenAI does not.
    for extra in ({"stream": 1}, {"stream": "true"}, {"temperature": "1.2"}, {"n": 2.0}):
        err = _refusal("chat/completions", {**CHAT, **extra})
        assert err.code == "invalid_type"
        assert err.param == next(iter(extra))


def test_stream_and_output_tokens_helpers() -> None:
    chat = parse_request(
        "chat/completions",
        {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 7},
    )
    assert isinstance(chat, ChatCompletionRequest)
    assert chat.wants_stream() and chat.stream_options and chat.stream_options.include_usage
    assert chat.max_output_tokens() == 7
    chat = parse_request("chat/completions", {**CHAT, "max_tokens": 7, "max_completion_tokens": 9})
    assert chat.max_output_tokens() == 9
    chat = parse_request("chat/completions", {**CHAT, "stream": None})
    assert not chat.wants_stream() and chat.max_output_tokens() is None

    completion = parse_request("completions", {"model": "m", "prompt": "x", "max_tokens": 0})
    assert isinstance(completion, CompletionRequest)
    assert not completion.wants_stream() and completion.max_output_tokens() == 0

    embedding = parse_request("embeddings", {"model": "m", "input": "x"})
    batch = parse_request("batches", {"model": "m", "input_file": "/eagle/in.jsonl"})
    assert isinstance(embedding, EmbeddingRequest) and isinstance(batch, FirstBatchRequest)
    for body in (embedding, batch):
        assert not body.wants_stream() and body.max_output_tokens() is None


# What vLLM documents beyond OpenAI's parameters, one valid value each (chat and completions).
VLLM_GENERATION = {
    "use_beam_search": False,
    "top_k": -1,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "length_penalty": 1.0,
    "stop_token_ids": [2],
    "include_stop_str_in_output": True,
    "ignore_eos": False,
    "min_tokens": 1,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "truncate_prompt_tokens": 512,
    "prompt_logprobs": 1,
    "allowed_token_ids": [1, 2, 3],
    "bad_words": ["spam"],
    "structured_outputs": {"choice": ["yes", "no"]},
    "guided_json": {"type": "object"},
    "guided_regex": "[a-z]+",
    "guided_choice": ["yes", "no"],
    "guided_grammar": "root ::= 'a'",
    "structural_tag": "{}",
    "guided_decoding_backend": "xgrammar",
    "guided_whitespace_pattern": " ",
    "logits_processors": ["pkg.Processor", {"qualname": "pkg.Other", "args": [1]}],
    "return_tokens_as_token_ids": True,
    "return_token_ids": True,
    "kv_transfer_params": {"do_remote_decode": False},
    "vllm_xargs": {"a": 1, "b": "x", "c": 0.5},
    "priority": -1,
    "request_id": "my-id",
    "add_special_tokens": False,
    "mm_processor_kwargs": {"num_crops": 4},
    "cache_salt": "salt",
}
VLLM_CHAT_ONLY = {
    "best_of": 2,
    "echo": True,
    "add_generation_prompt": False,
    "continue_final_message": True,
    "documents": [{"title": "t", "text": "x"}],
    "chat_template": "{{ messages }}",
    "chat_template_kwargs": {"enable_thinking": False},
    "include_reasoning": False,
}


def test_vllm_parameters_are_accepted_on_every_route() -> None:
    # Where FIRST refused vLLM's parameters, the gateway follows vLLM.
    chat = parse_request("chat/completions", {**CHAT, **VLLM_GENERATION, **VLLM_CHAT_ONLY})
    assert isinstance(chat, ChatCompletionRequest) and chat.sequences() == 2  # best_of counts
    completion = {"model": "m", "prompt": "x", **VLLM_GENERATION, "echo": True}
    parse_request("completions", {**completion, "response_format": {"type": "json_object"}})
    parse_request(
        "embeddings",
        {
            "model": "m",
            "input": "x",
            "truncate_prompt_tokens": -1,
            "normalize": True,
            "embed_dtype": "float16",
            "additional_data": {"k": [1]},
            "add_special_tokens": True,
            "priority": 2,
            "request_id": "r",
        },
    )
    parse_request("chat/completions", {**CHAT, "guided_json": '{"type": "object"}'})
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    stream["stream_options"]["continuous_usage_stats"] = True
    parse_request("chat/completions", {**CHAT, **stream})
    tag = {"begin": "<f>", "schema": {"type": "object"}, "end": "</f>"}
    structural = {"type": "structural_tag", "structures": [tag], "triggers": ["<f"]}
    parse_request("chat/completions", {**CHAT, "response_format": structural})
    structural = {"type": "structural_tag", "format": {"type": "triggered_tags"}}
    parse_request("completions", {"model": "m", "prompt": "x", "response_format": structural})
    err = _refusal("chat/completions", {**CHAT, "response_format": {"type": "structural_tag"}})
    assert err.param == "response_format"
    # FIRST's literal `extra_body` key stays accepted.
    parse_request("chat/completions", {**CHAT, "extra_body": {"use_beam_search": True}})


@pytest.mark.parametrize(
    ("key", "value", "param"),
    [
        ("top_k", -2, "top_k"),
        ("top_k", 1.5, "top_k"),
        ("min_p", 1.5, "min_p"),
        ("repetition_penalty", 0, "repetition_penalty"),
        ("priority", "high", "priority"),
        ("min_tokens", -1, "min_tokens"),
        ("stop_token_ids", [-1], "stop_token_ids.0"),
        ("guided_json", 3, "guided_json"),
        ("guided_choice", [], "guided_choice"),
        ("chat_template_kwargs", "x", "chat_template_kwargs"),
        ("vllm_xargs", {"a": [1]}, "vllm_xargs.a"),
        ("cache_salt", "", "cache_salt"),
        ("truncate_prompt_tokens", -2, "truncate_prompt_tokens"),
    ],
)
def test_a_bad_vllm_value_names_its_param(key: str, value: Any, param: str) -> None:
    err = _refusal("chat/completions", {**CHAT, key: value})
    assert err.status == 400 and err.param == param and key in str(err)


def test_unknown_keys_and_other_routes_params_stay_refused() -> None:
    err = _refusal("chat/completions", {**CHAT, "top_kk": 1})
    assert (err.param, err.code) == ("top_kk", "unknown_parameter")
    assert "Unrecognized request argument supplied: top_kk" in str(err)
    # Chat-template options mean nothing to a text completion, sampling nothing to embeddings.
    err = _refusal("completions", {"model": "m", "prompt": "x", "chat_template": "t"})
    assert err.param == "chat_template"
    err = _refusal("embeddings", {"model": "m", "input": "x", "top_k": 5})
    assert err.param == "top_k"
    # OpenAI's own parameters keep OpenAI's ranges.
    assert _refusal("chat/completions", {**CHAT, "temperature": 2.5}).param == "temperature"


def test_embedding_array_limits() -> None:
    assert _refusal("embeddings", {"model": "m", "input": ["x"] * 2049}).param == "input"
    assert _refusal("embeddings", {"model": "m", "input": [[1] * 2049]}).param == "input.0"
    assert _refusal("embeddings", {"model": "m", "input": []}).param == "input"
    parse_request("embeddings", {"model": "m", "input": [[1] * 2048] * 3})


# ---- what the official SDK sends -----------------------------------------------------------------

_TOOL_CALL_MESSAGE = {
    # What vLLM returns for a tool call; the SDK sends these keys back when it is appended.
    "role": "assistant",
    "content": None,
    "refusal": None,
    "annotations": None,
    "audio": None,
    "function_call": None,
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Boston"}'},
        }
    ],
    "reasoning_content": None,
}


def _reply(path: str, body: dict[str, Any]) -> httpx2.Response:
    if body.get("stream"):
        return httpx2.Response(
            200, text="data: [DONE]\n\n", headers={"content-type": "text/event-stream"}
        )
    if path.endswith("/embeddings"):
        vector: Any = "AAAAAA==" if body.get("encoding_format") == "base64" else [0.0]
        return httpx2.Response(
            200,
            json={
                "object": "list",
                "model": body["model"],
                "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            },
        )
    message = (
        _TOOL_CALL_MESSAGE
        if body.get("tools")
        else {"role": "assistant", "content": '{"answer": "42"}'}
    )
    choice = {"index": 0, "finish_reason": "stop", "message": message, "text": "", "logprobs": None}
    return httpx2.Response(
        200,
        json={"id": "x", "object": "x", "created": 0, "model": body["model"], "choices": [choice]},
    )


@pytest.fixture
def sdk() -> Iterator[tuple[openai.OpenAI, list[dict[str, Any]]]]:
    """An SDK client whose requests go through `parse_request`, refused with our error body."""
    sent: list[dict[str, Any]] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        kind = next(
            k for k in ("chat/completions", "completions", "embeddings") if path.endswith(k)
        )
        body = json.loads(request.content)
        sent.append(body)
        try:
            parse_request(kind, request.content)  # type: ignore[arg-type]
        except InvalidRequestError as err:
            return httpx2.Response(err.status, json=err.to_body())
        return _reply(path, body)

    transport = httpx2.MockTransport(handle)
    with openai.OpenAI(
        api_key="t",
        base_url="http://gateway.test/v1",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    ) as client:
        yield client, sent


SdkClient = tuple[openai.OpenAI, list[dict[str, Any]]]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True,
    },
}


def test_sdk_chat_calls_are_accepted(sdk: SdkClient) -> None:
    client, sent = sdk
    messages: list[Any] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Boston?"},
    ]
    client.chat.completions.create(
        model="m",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=64,
        max_completion_tokens=64,
        temperature=0.2,
        top_p=0.9,
        seed=7,
        n=1,
        logprobs=True,
        top_logprobs=3,
        stop=["\n\n"],
        user="alice",
        frequency_penalty=0.1,
        presence_penalty=0.1,
        logit_bias={"50256": -100},
        response_format={"type": "json_object"},
    ).close()
    assert sent[-1]["stream_options"] == {"include_usage": True}

    reply = client.chat.completions.create(
        model="m", messages=messages, tools=[WEATHER_TOOL], tool_choice="auto"
    )
    # The usual tool loop: append the SDK's message object, then the tool result.
    messages += [
        reply.choices[0].message,
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
    assert sent[-1]["messages"][2]["tool_calls"][0]["id"] == "call_1"

    class Answer(BaseModel):
        answer: str

    client.chat.completions.parse(model="m", messages=messages[:2], response_format=Answer)
    assert sent[-1]["response_format"]["type"] == "json_schema"

    client.chat.completions.create(
        model="m",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                ],
            }
        ],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        tools=[WEATHER_TOOL],
        parallel_tool_calls=False,
        reasoning_effort="low",
    )


def test_sdk_embedding_calls_are_accepted(sdk: SdkClient) -> None:
    client, sent = sdk
    client.embeddings.create(model="m", input="hello")
    assert sent[-1]["encoding_format"] == "base64"  # the SDK's default
    client.embeddings.create(model="m", input=["a", "b"], dimensions=8, encoding_format="float")
    client.embeddings.create(model="m", input=[1, 2, 3], user="alice")
    client.embeddings.create(model="m", input=[[1, 2], [3]])


@pytest.mark.parametrize("prompt", ["hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_sdk_completion_calls_are_accepted(sdk: SdkClient, prompt: Any) -> None:
    client, sent = sdk
    client.completions.create(
        model="m",
        prompt=prompt,
        max_tokens=16,
        echo=True,
        logprobs=2,
        suffix="!",
        best_of=2,
        n=2,
        stop="\n",
        seed=1,
        temperature=0.5,
        top_p=1,
        user="alice",
    )
    client.completions.create(
        model="m", prompt=prompt, stream=True, stream_options={"include_usage": True}
    ).close()
    assert sent[-1]["prompt"] == prompt


def test_sdk_sees_the_refusal(sdk: SdkClient) -> None:
    client, _ = sdk
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], temperature=3.5
        )
    assert info.value.param == "temperature"
    assert info.value.code == "invalid_value"
    assert "must be at most 2" in info.value.message
