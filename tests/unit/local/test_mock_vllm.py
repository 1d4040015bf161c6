"""The mock vLLM server, driven over a real socket by the real `openai` SDK."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import time
from array import array
from collections.abc import Iterator

import httpx
import openai
import pytest

from first_local.mock_vllm import MockConfig, count_prompt_tokens, create_app, generate_text
from tests.support.asgi import serve as serve_app

CHAT_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
EMBED_MODEL = "Salesforce/SFR-Embedding-Mistral"


@contextlib.contextmanager
def serve(config: MockConfig) -> Iterator[str]:
    with serve_app(create_app(config)) as url:
        yield url


def sdk(base_url: str, api_key: str = "x") -> openai.OpenAI:
    # No retries: an injected 500 must surface once, not be retried with backoff.
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve(MockConfig()) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return sdk(base_url)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


# -- pure functions -------------------------------------------------------------------------

def test_generate_text_is_deterministic_and_shaped() -> None:
    lengths = set()
    for i in range(50):
        tokens, finish = generate_text(CHAT_MODEL, f"prompt {i}", None)
        assert (tokens, finish) == generate_text(CHAT_MODEL, f"prompt {i}", None)
        assert finish == "stop" and 8 <= len(tokens) <= 48
        assert all(t.startswith(" ") and t.strip() for t in tokens[1:])
        lengths.add(len(tokens))
    assert len(lengths) > 5
    assert generate_text(CHAT_MODEL, "a", None) != generate_text(EMBED_MODEL, "a", None)
    full, _ = generate_text(CHAT_MODEL, "x", None)
    capped, finish = generate_text(CHAT_MODEL, "x", 3)
    assert (capped, finish) == (full[:3], "length")
    assert generate_text(CHAT_MODEL, "x", len(full)) == (full, "stop")
    tokens, finish = generate_text(CHAT_MODEL, "x [mock:tokens=100]", None)
    assert len(tokens) == 100 and finish == "stop" and "mock" not in "".join(tokens)
    assert count_prompt_tokens("Hello, world!") == 4


# -- chat ------------------------------------------------------------------------------------

def test_health_and_models(base_url: str, client: openai.OpenAI) -> None:
    response = httpx.get(f"{base_url}/health")
    assert response.status_code == 200 and response.content == b""
    models = client.models.list().data
    assert [m.id for m in models] == list(MockConfig().models)
    assert all(m.owned_by == "vllm" and m.object == "model" for m in models)
    assert (models[0].model_extra or {})["max_model_len"] == 8192


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi there, mock!"},
                                             {"type": "image_url",
                                              "image_url": {"url": "http://x/y.png"}}]}]
    result = client.chat.completions.create(model=CHAT_MODEL, messages=messages)
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    assert result.model == CHAT_MODEL and result.created > 0
    [choice] = result.choices
    assert choice.index == 0 and choice.finish_reason == "stop" and choice.logprobs is None
    assert choice.message.role == "assistant" and choice.message.tool_calls == []
    assert choice.message.content
    assert result.usage is not None
    assert result.usage.prompt_tokens == count_prompt_tokens("Be brief.") + count_prompt_tokens(
        "Hi there, mock!")
    assert 8 <= result.usage.completion_tokens <= 48
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    again = client.chat.completions.create(model=CHAT_MODEL, messages=messages)
    assert again.choices[0].message.content == choice.message.content


def test_chat_stream_matches_non_stream_and_vllm_chunk_shape(client: openai.OpenAI) -> None:
    messages = user("Tell me about streaming.")
    whole = client.chat.completions.create(model=CHAT_MODEL, messages=messages)
    for include_usage in (False, True):
        chunks = list(client.chat.completions.create(
            model=CHAT_MODEL, messages=messages, stream=True,
            stream_options={"include_usage": True} if include_usage else None))
        assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        first, *content = chunks
        if include_usage:
            *content, usage_chunk = content
            assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
        assert all(c.choices for c in [first, *content]) and all(
            c.usage is None for c in [first, *content])
        assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
        assert first.choices[0].finish_reason is None
        assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + [
            "stop"]
        assert all(c.choices[0].delta.content for c in content)
        assert whole.usage is not None and len(content) == whole.usage.completion_tokens
        text = "".join(c.choices[0].delta.content or "" for c in content)
        assert text == whole.choices[0].message.content


def test_chat_stream_wire_format(base_url: str) -> None:
    body = {"model": CHAT_MODEL, "messages": user("wire [mock:tokens=2]"), "stream": True}
    for include_usage in (False, True):
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        response = httpx.post(f"{base_url}/v1/chat/completions", json=body)
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.text.endswith("data: [DONE]\n\n")
        events = [json.loads(e.removeprefix("data: ")) for e in response.text.split("\n\n")[:-2]]
        assert [e["choices"][0]["delta"] for e in events[:3]] == [
            {"role": "assistant", "content": ""}, {"content": events[1]["choices"][0]["delta"][
                "content"]}, {"content": events[2]["choices"][0]["delta"]["content"]}]
        if include_usage:
            assert len(events) == 4 and events[3]["choices"] == []
            assert events[3]["usage"]["completion_tokens"] == 2
            assert all("usage" in e and e["usage"] is None for e in events[:3])
        else:
            assert len(events) == 3 and all("usage" not in e for e in events)


def test_continuous_usage_stats_puts_the_running_usage_on_every_chunk(base_url: str) -> None:
    body = {"model": CHAT_MODEL, "messages": user("count me [mock:tokens=3]"), "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body)
    events = [json.loads(e.removeprefix("data: ")) for e in response.text.split("\n\n")[:-2]]
    prompt = count_prompt_tokens("Be brief.") + count_prompt_tokens("count me [mock:tokens=3]")
    assert [e["usage"] for e in events[:-1]] == [
        {"prompt_tokens": prompt, "completion_tokens": k, "total_tokens": prompt + k}
        for k in range(4)
    ]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3


def test_received_marker_answers_the_body_and_vllm_extras_are_accepted(base_url: str) -> None:
    extras = {"top_k": 5, "min_p": 0.1, "guided_json": {"type": "object"}, "priority": 3,
              "chat_template_kwargs": {"enable_thinking": False}, "unheard_of": [1]}
    body = {"model": CHAT_MODEL, "messages": user("what did you get [mock:received]"), **extras}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body)
    assert response.status_code == 200  # like vLLM: unknown fields are ignored, not refused
    assert json.loads(response.json()["choices"][0]["message"]["content"]) == body
    prompt = {"model": CHAT_MODEL, "prompt": "echo [mock:received]", "max_tokens": 3, **extras}
    response = httpx.post(f"{base_url}/v1/completions", json=prompt)
    assert json.loads(response.json()["choices"][0]["text"]) == prompt


def test_max_tokens_caps_and_reports_length(client: openai.OpenAI) -> None:
    for kwargs in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        result = client.chat.completions.create(model=CHAT_MODEL, messages=user("cap me"),
                                                **kwargs)
        assert result.choices[0].finish_reason == "length"
        assert result.usage is not None and result.usage.completion_tokens == 5
        stream = client.chat.completions.create(model=CHAT_MODEL, messages=user("cap me"),
                                                stream=True, **kwargs)
        content = [c for c in stream if c.choices and c.choices[0].delta.content]
        assert len(content) == 5 and content[-1].choices[0].finish_reason == "length"


def test_tokens_marker_sets_exact_length_and_is_not_echoed(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=CHAT_MODEL,
                                            messages=user("Say it [mock:tokens=30]"))
    assert result.usage is not None and result.usage.completion_tokens == 30
    assert result.choices[0].finish_reason == "stop"
    assert "mock" not in (result.choices[0].message.content or "")


def test_n_returns_identical_choices(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=CHAT_MODEL, messages=user("twice"), n=2)
    assert [c.index for c in result.choices] == [0, 1]
    assert result.choices[0].message.content == result.choices[1].message.content


# -- completions -----------------------------------------------------------------------------

def test_completions_string_list_and_token_prompts(client: openai.OpenAI) -> None:
    result = client.completions.create(model=CHAT_MODEL, prompt="Once upon", max_tokens=100)
    tokens, finish = generate_text(CHAT_MODEL, "Once upon", 100)
    assert result.id.startswith("cmpl-") and result.object == "text_completion"
    assert result.choices[0].text == "".join(tokens) and result.choices[0].finish_reason == finish
    assert result.usage is not None and result.usage.completion_tokens == len(tokens)
    assert result.usage.prompt_tokens == count_prompt_tokens("Once upon")

    prompts = ["first prompt", "second prompt"]
    result = client.completions.create(model=CHAT_MODEL, prompt=prompts, max_tokens=100)
    assert [c.index for c in result.choices] == [0, 1]
    assert [c.text for c in result.choices] == [
        "".join(generate_text(CHAT_MODEL, p, 100)[0]) for p in prompts]

    result = client.completions.create(model=CHAT_MODEL, prompt=[[1, 2, 3], [4, 5]], max_tokens=4)
    assert result.usage is not None and result.usage.prompt_tokens == 5
    assert [c.finish_reason for c in result.choices] == ["length", "length"]

    default = client.completions.create(model=CHAT_MODEL, prompt="x [mock:tokens=40]")
    assert default.usage is not None and default.usage.completion_tokens == 16  # vLLM's default


def test_completions_stream_matches(client: openai.OpenAI) -> None:
    prompts = ["alpha [mock:tokens=3]", "beta [mock:tokens=5]"]
    whole = client.completions.create(model=CHAT_MODEL, prompt=prompts, max_tokens=100)
    chunks = list(client.completions.create(model=CHAT_MODEL, prompt=prompts, max_tokens=100,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine][-1] == "stop"
        assert all(c.finish_reason is None for c in mine[:-1])


# -- embeddings ------------------------------------------------------------------------------

def test_embeddings_float_and_base64_agree_and_are_unit(client: openai.OpenAI) -> None:
    inputs = ["hello world", "another text"]
    floats = client.embeddings.create(model=EMBED_MODEL, input=inputs, encoding_format="float")
    b64 = client.embeddings.create(model=EMBED_MODEL, input=inputs)  # SDK asks for base64
    assert [d.embedding for d in floats.data] == [d.embedding for d in b64.data]
    assert [d.index for d in floats.data] == [0, 1] and floats.object == "list"
    for d in floats.data:
        assert len(d.embedding) == 4096
        assert math.isclose(math.fsum(x * x for x in d.embedding), 1.0, abs_tol=1e-5)
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 4
    small = client.embeddings.create(model=EMBED_MODEL, input=[[1, 2, 3]], dimensions=8)
    assert len(small.data[0].embedding) == 8 and small.usage.prompt_tokens == 3


def test_embeddings_base64_wire_format(base_url: str) -> None:
    body = {"model": EMBED_MODEL, "input": "hi", "encoding_format": "base64", "dimensions": 4}
    raw = httpx.post(f"{base_url}/v1/embeddings", json=body).json()
    values = array("f")
    values.frombytes(base64.b64decode(raw["data"][0]["embedding"]))
    body["encoding_format"] = "float"
    assert values.tolist() == httpx.post(f"{base_url}/v1/embeddings", json=body).json()[
        "data"][0]["embedding"]


# -- errors ----------------------------------------------------------------------------------

def test_error_marker_gives_500(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=user("boom [mock:error]"))
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "InternalServerError"
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=CHAT_MODEL, prompt="x [mock:error-after=2]")


def test_error_after_aborts_the_stream(client: openai.OpenAI, base_url: str) -> None:
    stream = client.chat.completions.create(model=CHAT_MODEL, stream=True,
                                            messages=user("go [mock:error-after=3]"))
    seen = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen[0] == "" and len([s for s in seen[1:] if s]) == 3 and len(seen) == 4
    assert isinstance(info.value.body, dict) and info.value.body["code"] == 500

    body = {"model": CHAT_MODEL, "stream": True, "messages": user("go [mock:error-after=3]")}
    raw = httpx.post(f"{base_url}/v1/chat/completions", json=body).text
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["type"] == "InternalServerError"


def test_unknown_model_and_bad_body(client: openai.OpenAI, base_url: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=user("hi"))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT_MODEL, messages=[])
    response = httpx.post(f"{base_url}/v1/chat/completions", content=b"not json")
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    response = httpx.post(f"{base_url}/v1/embeddings", json={"model": "nope", "input": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == 404


def test_api_key_is_enforced() -> None:
    with serve(MockConfig(api_key="sekret")) as url:
        with pytest.raises(openai.AuthenticationError):
            sdk(url, "wrong").models.list()
        assert sdk(url, "sekret").models.list().data
        assert httpx.get(f"{url}/health").status_code == 200


def test_config_error_and_hang_rates() -> None:
    with serve(MockConfig(error_rate=1.0)) as url, pytest.raises(openai.InternalServerError):
        sdk(url).chat.completions.create(model=CHAT_MODEL, messages=user("hi"))
    with serve(MockConfig(hang_rate=1.0, hang_seconds=0.3)) as url:
        start = time.monotonic()
        sdk(url).chat.completions.create(model=CHAT_MODEL, messages=user("hi"))
        assert time.monotonic() - start >= 0.3


# -- timing ----------------------------------------------------------------------------------

def test_token_rate_and_first_token_delay() -> None:
    with serve(MockConfig(tokens_per_second=200)) as url:
        start = time.monotonic()
        chunks = list(sdk(url).chat.completions.create(
            model=CHAT_MODEL, messages=user("pace [mock:tokens=50]"), stream=True))
        elapsed = time.monotonic() - start
        assert len([c for c in chunks if c.choices[0].delta.content]) == 50
        assert 0.2 <= elapsed <= 1.0

    with serve(MockConfig()) as url:
        start = time.monotonic()
        stream = sdk(url).chat.completions.create(model=CHAT_MODEL, stream=True,
                                                  messages=user("wait [mock:delay=300]"))
        next(iter(stream))
        assert time.monotonic() - start >= 0.3
        stream.close()


def test_full_speed_streams_fast(base_url: str) -> None:
    # Counted off the raw SSE lines: the openai SDK's per-chunk model building caps a client
    # at roughly 5k chunks/s on its own, which would measure the SDK rather than the server.
    body = {"model": CHAT_MODEL, "stream": True, "messages": user("fast [mock:tokens=20000]")}
    start = time.monotonic()
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        count = sum(1 for line in response.iter_lines() if '"delta":{"content":"' in line)
    rate = count / (time.monotonic() - start)
    assert count == 20000 and rate >= 5000, f"{rate:.0f} tokens/s"
