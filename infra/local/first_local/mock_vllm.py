"""A built-in OpenAI-compatible stand-in for `vllm serve`, so the local stack and tests need no GPU.

Wire shapes follow vLLM's OpenAI server (which the real `openai` SDK reaches through the gateway),
including its streaming quirks: the role-only first chunk, `finish_reason` on the last content
chunk, a separate `choices: []` usage chunk, and `{"error": ...}` events on a mid-stream failure.

Output is deterministic: the words are a function of (model, prompt text) only, so a streamed and a
non-streamed request with the same body give the same text, and `n` > 1 yields identical choices.
Tests can trigger failures on a shared server with markers in the last user message / prompt:
`[mock:error]`, `[mock:error-after=N]`, `[mock:delay=MS]`, `[mock:tokens=N]`,
`[mock:rate=N]` (tokens per second for that request), and `[mock:received]`: the answer's text
is the JSON body the mock received (compact), so a test sees what reached vLLM.

Like vLLM, parameters it does not act on (vLLM's sampling and structured-output extras) are
accepted and ignored. `stream_options.continuous_usage_stats` puts the running usage on every chunk.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import random
import re
import sys
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

_VOCAB = (
    "the",
    "model",
    "answers",
    "with",
    "plain",
    "words",
    "drawn",
    "from",
    "a",
    "small",
    "fixed",
    "list",
    "so",
    "every",
    "reply",
    "is",
    "reproducible",
    "across",
    "runs",
    "while",
    "looking",
    "like",
    "prose",
    "about",
    "compute",
    "nodes",
    "clusters",
    "batches",
    "tokens",
    "queues",
    "latency",
    "gateways",
    "endpoints",
    "scheduling",
    "memory",
    "tensors",
    "and",
    "of",
    "to",
)
_MAX_MODEL_LEN = {
    "meta-llama/Meta-Llama-3-8B-Instruct": 8192,
    "meta-llama/Meta-Llama-3.1-70B-Instruct": 131072,
    "Salesforce/SFR-Embedding-Mistral": 4096,
}
_DEFAULT_MAX_MODEL_LEN = 8192
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's) default for /v1/completions only
_MARKER = re.compile(r"\[mock:(?:(error|received)|(error-after|delay|tokens|rate)=(\d+))\]")
_WORD = re.compile(r"\w+|[^\w\s]")
# At full speed, coalescing SSE events into fewer socket writes is what keeps the rate high.
_MAX_EVENTS_PER_WRITE = 64


@dataclass(frozen=True)
class MockConfig:
    """What the mock vLLM serves and how: its models, speed, injected faults and API key."""

    models: tuple[str, ...] = (
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "meta-llama/Meta-Llama-3.1-70B-Instruct",
        "Salesforce/SFR-Embedding-Mistral",
        "meta-llama/Llama-3.2-1B-Instruct",
    )
    first_token_delay_s: float = 0.0  # time before the first token (prefill)
    tokens_per_second: float = 0.0  # 0 = as fast as possible
    error_rate: float = 0.0  # fraction of requests answered 500
    hang_rate: float = 0.0  # fraction of requests that hang for hang_seconds before answering
    hang_seconds: float = 600.0
    embedding_dimensions: int = 4096
    api_key: str | None = None  # like `vllm serve --api-key`: require `Authorization: Bearer <key>`
    seed: int = 0


@dataclass
class _Markers:
    error: bool = False
    received: bool = False  # answer with the body received
    error_after: int | None = None
    delay_s: float = 0.0
    tokens: int | None = None
    rate: float | None = None  # tokens per second for this request, instead of the config's

    def merge(self, other: _Markers) -> None:
        self.error = self.error or other.error
        self.received = self.received or other.received
        if other.error_after is not None:
            mine = self.error_after
            self.error_after = other.error_after if mine is None else min(mine, other.error_after)
        self.delay_s = max(self.delay_s, other.delay_s)
        self.rate = other.rate if other.rate is not None else self.rate


@dataclass
class _Choice:
    index: int
    tokens: list[str]
    finish_reason: str


class _APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status,
            }
        }


def _bad_request(message: str, param: str | None = None) -> _APIError:
    return _APIError(400, message, "BadRequestError", param)


def count_prompt_tokens(text: str) -> int:
    """The prompt's token count as the mock counts it (each word and each punctuation mark)."""
    return len(_WORD.findall(text))


def _parse_markers(text: str) -> _Markers:
    markers = _Markers()
    for flag, name, value in _MARKER.findall(text):
        if flag == "received":
            markers.received = True
        elif flag:
            markers.error = True
        elif name == "error-after":
            markers.error_after = int(value)
        elif name == "delay":
            markers.delay_s += int(value) / 1000
        elif name == "rate":
            markers.rate = float(value)
        else:
            markers.tokens = int(value)
    return markers


def _generate(
    model: str, prompt: str, length: int | None, max_tokens: int | None
) -> tuple[list[str], str]:
    # Markers and whitespace are dropped from the key so that steering a request with a marker
    # does not change which words it gets, only how many.
    key = " ".join(_MARKER.sub(" ", prompt).split())
    digest = hashlib.sha256(f"{model}\0{key}".encode()).digest()
    natural = length if length is not None else 8 + digest[0] % 41
    count = natural if max_tokens is None else min(natural, max_tokens)
    rng = random.Random(int.from_bytes(digest, "big"))
    words = [rng.choice(_VOCAB) for _ in range(count)]
    if count:
        words[0] = words[0].capitalize()
        if count == natural:
            words[-1] += "."
    tokens = [w if i == 0 else f" {w}" for i, w in enumerate(words)]
    return tokens, "length" if count < natural else "stop"


def generate_text(model: str, prompt: str, max_tokens: int | None) -> tuple[list[str], str]:
    """The completion of `prompt` as the mock would serve it (honours `[mock:tokens=N]`)."""
    return _generate(model, prompt, _parse_markers(prompt).tokens, max_tokens)


def _embedding(model: str, text: str, dimensions: int) -> list[float]:
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{model}\0{text}".encode()).digest(), "big"))
    raw = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(math.fsum(x * x for x in raw)) or 1.0
    # Round through float32 so that "float" and "base64" answers carry the very same numbers.
    return array("f", [x / norm for x in raw]).tolist()


def _b64_float32(values: list[float]) -> str:
    packed = array("f", values)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _texts(value: object, param: str) -> list[tuple[str, int]]:
    """(text, token count) per input; token arrays become their ids joined by spaces."""
    if isinstance(value, str):
        return [(value, count_prompt_tokens(value))]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [(v, count_prompt_tokens(v)) for v in value]
        if all(_is_int(v) for v in value):
            return [(" ".join(map(str, value)), len(value))]
        if all(isinstance(v, list) and v and all(_is_int(x) for x in v) for v in value):
            return [(" ".join(map(str, v)), len(v)) for v in value]
    raise _bad_request(f"`{param}` must be a string, a list of strings or token id arrays", param)


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: only the text ones count as text
        return "\n".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _int_param(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is not None and (not _is_int(value) or value < minimum):
        raise _bad_request(f"`{name}` must be an integer >= {minimum}", name)
    return value


def _check_context(model: str, prompt_tokens: int, max_tokens: int | None) -> None:
    limit = _MAX_MODEL_LEN.get(model, _DEFAULT_MAX_MODEL_LEN)
    if prompt_tokens + (max_tokens or 0) > limit:
        raise _bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + (max_tokens or 0)} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens or 0} in the completion). Please reduce the length of the messages "
            "or completion."
        )


def _compact(payload: object) -> str:
    return json.dumps(payload, separators=(",", ":"))


def _sse(payload: object) -> str:
    return f"data: {_compact(payload)}\n\n"


class _MockServer:
    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)  # owned by the app so injected faults are replayable
        # The key it requires now (`/_standin/api-key` changes it: a refused key on demand).
        self.api_key = config.api_key
        # Streams begun, run to their end, and cut off by their client (`/_standin/streams`).
        self.streams = {"opened": 0, "finished": 0, "disconnected": 0}

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model") or self.config.models[0]  # vLLM also defaults a missing model
        if model not in self.config.models:
            raise _APIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return str(model)

    async def _sleep_until(self, request: Request, deadline: float) -> None:
        # Poll for a disconnect so that a hung request does not outlive its client (and block
        # a graceful shutdown) for the whole hang.
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.25))
            if left > 0.25 and await request.is_disconnected():
                raise _APIError(499, "Client disconnected.", "ClientDisconnected")  # unseen

    async def _admit(self, request: Request, markers: _Markers) -> None:
        fail, hang = self.rng.random(), self.rng.random()  # always draw both: stable sequence
        if markers.error or fail < self.config.error_rate:
            raise _APIError(500, "Mock engine failure (injected).", "InternalServerError")
        if hang < self.config.hang_rate:
            await self._sleep_until(request, time.monotonic() + self.config.hang_seconds)

    def endpoint(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            key = self.api_key
            if key is not None and request.headers.get("authorization") != f"Bearer {key}":
                return JSONResponse({"error": "Unauthorized"}, status_code=401)  # vLLM's shape
            try:
                return await handler(request)
            except _APIError as e:
                return JSONResponse(e.body(), status_code=e.status)

        return guarded

    async def models(self, request: Request) -> Response:
        now = int(time.time())
        permission = {
            "id": f"modelperm-{uuid.uuid4().hex}",
            "object": "model_permission",
            "created": now,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        data = [
            {
                "id": m,
                "object": "model",
                "created": now,
                "owned_by": "vllm",
                "root": m,
                "parent": None,
                "max_model_len": _MAX_MODEL_LEN.get(m, _DEFAULT_MAX_MODEL_LEN),
                "permission": [permission],
            }
            for m in self.config.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: Request) -> Response:
        body = await _json_body(request)
        model = self._model(body)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        ):
            raise _bad_request("`messages` must be a non-empty list of {role, content}", "messages")
        texts = [(m["role"], _content_text(m.get("content"))) for m in messages]
        last_user = next((t for role, t in reversed(texts) if role == "user"), "")
        markers = _parse_markers(last_user)
        max_tokens = _int_param(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _int_param(body, "max_tokens", 1)
        n = _int_param(body, "n", 1) or 1
        prompt_tokens = sum(count_prompt_tokens(t) for _, t in texts)
        _check_context(model, prompt_tokens, max_tokens)
        tokens, finish = _generate(
            model, "\n".join(f"{r}: {t}" for r, t in texts), markers.tokens, max_tokens
        )
        if markers.received:
            tokens, finish = [_compact(body)], "stop"
        choices = [_Choice(i, tokens, finish) for i in range(n)]
        return await self._respond(request, body, True, model, choices, prompt_tokens, markers)

    async def completions(self, request: Request) -> Response:
        body = await _json_body(request)
        model = self._model(body)
        prompts = _texts(body.get("prompt"), "prompt")
        max_tokens = _int_param(body, "max_tokens", 0)  # 0 with echo scores the prompt
        if "max_tokens" not in body:
            max_tokens = _COMPLETIONS_DEFAULT_MAX_TOKENS
        n = _int_param(body, "n", 1) or 1
        markers, choices = _Markers(), []
        for i, (text, count) in enumerate(prompts):
            _check_context(model, count, max_tokens)
            markers.merge(_parse_markers(text))
            tokens, finish = generate_text(model, text, max_tokens)
            if markers.received:
                tokens, finish = [_compact(body)], "stop"
            choices += [_Choice(i * n + j, tokens, finish) for j in range(n)]
        prompt_tokens = sum(count for _, count in prompts)
        return await self._respond(request, body, False, model, choices, prompt_tokens, markers)

    async def _respond(
        self,
        request: Request,
        body: dict[str, Any],
        chat: bool,
        model: str,
        choices: list[_Choice],
        prompt_tokens: int,
        markers: _Markers,
    ) -> Response:
        stream, options = body.get("stream") or False, body.get("stream_options")
        if not isinstance(stream, bool) or not (options is None or isinstance(options, dict)):
            raise _bad_request("`stream` must be a boolean, `stream_options` an object", "stream")
        if options is not None and not stream:
            raise _bad_request(
                "Stream options can only be defined when `stream=True`.", "stream_options"
            )
        requested = max((len(c.tokens) for c in choices), default=0)
        await self._admit(request, markers)
        start = time.monotonic()
        completion_tokens = sum(len(c.tokens) for c in choices)
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
        }
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        if stream:
            include_usage = bool((options or {}).get("include_usage"))
            continuous = include_usage and bool((options or {}).get("continuous_usage_stats"))
            events = self._events(
                start, markers, chat, head, choices, usage if include_usage else None, continuous
            )
            return StreamingResponse(self._counted(events), media_type="text/event-stream")
        steps = requested if markers.error_after is None else min(markers.error_after, requested)
        await self._sleep_until(request, self._due(start, markers, steps))
        if markers.error_after is not None:
            raise _APIError(
                500, "Mock engine failure mid-generation (injected).", "InternalServerError"
            )
        body_choices: list[dict[str, Any]] = []
        for c in choices:
            text = "".join(c.tokens)
            content = (
                {"message": {"role": "assistant", "content": text, "tool_calls": []}}
                if chat
                else {"text": text}
            )
            body_choices.append(
                {
                    "index": c.index,
                    **content,
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": None,
                }
            )
        return JSONResponse({**head, "choices": body_choices, "usage": usage})

    async def _counted(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """A stream's events, counted: begun, then finished or cut off by its client (Starlette
        cancels the stream when the client disconnects)."""
        self.streams["opened"] += 1
        ended = "disconnected"
        try:
            async for event in events:
                yield event
            ended = "finished"
        finally:
            self.streams[ended] += 1

    async def standin_streams(self, request: Request) -> Response:
        """`GET /_standin/streams`: the stream counts, and how many are open now."""
        counts = dict(self.streams)
        counts["open"] = counts["opened"] - counts["finished"] - counts["disconnected"]
        return JSONResponse(counts)

    async def standin_api_key(self, request: Request) -> Response:
        """`POST /_standin/api-key` `{"api_key": K}`: require K from now on (null: no key), so a
        test can make the gateway's key wrong; answers the key it replaced."""
        body = await _json_body(request)
        before, self.api_key = self.api_key, body.get("api_key")
        return JSONResponse({"api_key": before})

    def _due(self, start: float, markers: _Markers, token_index: int) -> float:
        """When token `token_index` is due: a fixed schedule from the start, so no drift."""
        rate = markers.rate if markers.rate is not None else self.config.tokens_per_second
        pace = token_index / rate if rate > 0 else 0.0
        return start + self.config.first_token_delay_s + markers.delay_s + pace

    async def _events(
        self,
        start: float,
        markers: _Markers,
        chat: bool,
        head: dict[str, Any],
        choices: list[_Choice],
        usage: dict[str, Any] | None,
        continuous: bool = False,
    ) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        if usage is not None:
            head["usage"] = None  # as vLLM 0.5/0.6 did; newer versions omit the key instead
        generated = 0

        def chunk(index: int, delta: str | None, finish: str | None) -> str:
            nonlocal generated
            generated += delta is not None
            choice: dict[str, Any] = {"index": index}
            if chat:
                choice["delta"] = (
                    {"role": "assistant", "content": ""} if delta is None else {"content": delta}
                )
            else:
                choice["text"] = delta
            choice.update(logprobs=None, finish_reason=finish)
            if finish is not None:
                choice["stop_reason"] = None
            if continuous and usage is not None:
                # vLLM's continuous_usage_stats: the running count on every chunk.
                prompt = usage["prompt_tokens"]
                head["usage"] = {
                    "prompt_tokens": prompt,
                    "total_tokens": prompt + generated,
                    "completion_tokens": generated,
                }
            return _sse({**head, "choices": [choice]})

        limit = markers.error_after
        steps = max(len(c.tokens) for c in choices)
        steps = steps if limit is None else min(steps, limit)
        pending: list[str] = []
        for step in range(steps):
            due = self._due(start, markers, step)
            if pending and (due > time.monotonic() or len(pending) >= _MAX_EVENTS_PER_WRITE):
                yield "".join(pending)
                pending.clear()
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            # vLLM sends the role chunk with the first engine output, i.e. after prefill.
            if step == 0 and chat:
                pending += [chunk(c.index, None, None) for c in choices]
            for c in choices:
                if step < len(c.tokens):
                    last = step == len(c.tokens) - 1 and limit is None
                    finish = c.finish_reason if last else None
                    pending.append(chunk(c.index, c.tokens[step], finish))
        if limit is not None:
            error = _APIError(
                500, "Mock engine failure mid-stream (injected).", "InternalServerError"
            )
            yield "".join([*pending, _sse(error.body())])
            # Ends without [DONE] so a relay can tell an aborted stream from a finished one;
            # recent vLLM appends [DONE] after the error event, the openai SDK raises either way.
            return
        if usage is not None:
            pending.append(_sse({**head, "choices": [], "usage": usage}))
        yield "".join([*pending, "data: [DONE]\n\n"])

    async def embeddings(self, request: Request) -> Response:
        body = await _json_body(request)
        model = self._model(body)
        inputs = _texts(body.get("input"), "input")
        dimensions = _int_param(body, "dimensions", 1) or self.config.embedding_dimensions
        if dimensions > self.config.embedding_dimensions:  # matryoshka can only shorten
            raise _bad_request(
                f"`dimensions` must be <= {self.config.embedding_dimensions}", "dimensions"
            )
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _bad_request("`encoding_format` must be 'float' or 'base64'", "encoding_format")
        markers = _Markers()
        for text, _ in inputs:
            markers.merge(_parse_markers(text))
        await self._admit(request, markers)
        await self._sleep_until(request, self._due(time.monotonic(), markers, 0))
        data = []
        for i, (text, _) in enumerate(inputs):
            vector = _embedding(model, text, dimensions)
            data.append(
                {
                    "index": i,
                    "object": "embedding",
                    "embedding": _b64_float32(vector) if encoding == "base64" else vector,
                }
            )
        tokens = sum(count for _, count in inputs)
        return JSONResponse(
            {
                "id": f"embd-{uuid.uuid4().hex}",
                "object": "list",
                "created": int(time.time()),
                "model": model,
                "data": data,
                "usage": {
                    "prompt_tokens": tokens,
                    "total_tokens": tokens,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            }
        )


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise _bad_request("The request body must be a JSON object.")
    return body


async def _health(request: Request) -> Response:
    return Response(status_code=200)


def create_app(config: MockConfig = MockConfig()) -> Starlette:
    """The mock vLLM: OpenAI's chat, completions, embeddings, responses and models routes and
    Anthropic's messages (first_local.mock_vllm_apis), deterministic answers, SSE streams."""
    from first_local import mock_vllm_apis as apis  # it builds on this module

    server = _MockServer(config)

    async def responses(request: Request) -> Response:
        return await apis.responses(server, request)

    return Starlette(
        routes=[
            Route("/health", _health, methods=["GET"]),
            Route("/_standin/streams", server.standin_streams, methods=["GET"]),
            Route("/_standin/api-key", server.standin_api_key, methods=["POST"]),
            Route("/v1/models", server.endpoint(server.models), methods=["GET"]),
            Route("/v1/chat/completions", server.endpoint(server.chat), methods=["POST"]),
            Route("/v1/completions", server.endpoint(server.completions), methods=["POST"]),
            Route("/v1/embeddings", server.endpoint(server.embeddings), methods=["POST"]),
            Route("/v1/responses", server.endpoint(responses), methods=["POST"]),
            Route(
                "/v1/messages", apis.anthropic_errors(apis.messages, server), methods=["POST"]
            ),
        ]
    )
