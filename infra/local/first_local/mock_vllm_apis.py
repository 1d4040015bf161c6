"""The mock vLLM's `/v1/responses` (OpenAI's Responses API) and `/v1/messages` (Anthropic's
Messages API), in the shapes vLLM serves them, streamed (SSE with `event:` names, no `[DONE]`) and
not. The words are the ones chat would give for the same conversation (mock_vllm._generate), so a
streamed and a non-streamed request agree, and the `[mock:...]` markers of the last user message
work as they do for chat.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from first_local.mock_vllm import (
    _MAX_EVENTS_PER_WRITE,
    _APIError,
    _bad_request,
    _check_context,
    _content_text,
    _generate,
    _int_param,
    _json_body,
    _Markers,
    _parse_markers,
    count_prompt_tokens,
)

if TYPE_CHECKING:
    from first_local.mock_vllm import _MockServer

# Anthropic's error types by status, as its SDK maps them.
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _conversation(turns: list[tuple[str, str]]) -> str:
    return "\n".join(f"{role}: {text}" for role, text in turns)


def _items(value: object, param: str) -> list[tuple[str, str]]:
    """(role, text) of a Responses `input` (a string, or message items) or of Anthropic's
    `messages`."""
    if isinstance(value, str):
        return [("user", value)]
    if isinstance(value, list) and value and all(isinstance(i, dict) for i in value):
        return [
            (str(i.get("role") or "user"), _content_text(i.get("content")))
            for i in value
            if i.get("type", "message") == "message"
        ]
    raise _bad_request(f"`{param}` must be a string or a non-empty list of items", param)


async def _paced(
    server: _MockServer, start: float, markers: _Markers, tokens: list[str]
) -> AsyncIterator[tuple[int, str]]:
    """The tokens (index, text) at the mock's pace, up to `[mock:error-after=N]`."""
    limit = markers.error_after
    steps = len(tokens) if limit is None else min(len(tokens), limit)
    for step in range(steps):
        if (wait := server._due(start, markers, step) - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        yield step, tokens[step]


async def _batched(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Events coalesced into fewer writes while they are due at once (as chat's are)."""
    pending: list[str] = []
    async for event in events:
        pending.append(event)
        if len(pending) >= _MAX_EVENTS_PER_WRITE:
            yield "".join(pending)
            pending.clear()
    if pending:
        yield "".join(pending)


class _Generation:
    """One request's conversation, its words and its pace."""

    def __init__(self, model: str, turns: list[tuple[str, str]], max_tokens: int | None) -> None:
        last_user = next((t for role, t in reversed(turns) if role == "user"), "")
        self.model = model
        self.markers = _parse_markers(last_user)
        self.prompt_tokens = sum(count_prompt_tokens(t) for _, t in turns)
        _check_context(model, self.prompt_tokens, max_tokens)
        self.tokens, self.finish = _generate(
            model, _conversation(turns), self.markers.tokens, max_tokens
        )

    @property
    def text(self) -> str:
        return "".join(self.tokens)


# ---- OpenAI's Responses API ---------------------------------------------------------------------


def _response(body: dict[str, Any], gen: _Generation, rid: str, mid: str, done: bool) -> Any:
    complete = gen.finish == "stop"
    status = "in_progress" if not done else "completed" if complete else "incomplete"
    output: list[dict[str, Any]] = []
    if done:
        part: dict[str, Any] = {
            "type": "output_text",
            "text": gen.text,
            "annotations": [],
            "logprobs": None,
        }
        output = [
            {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [part],
            }
        ]
    usage = None
    if done:
        usage = {
            "input_tokens": gen.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(gen.tokens),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": gen.prompt_tokens + len(gen.tokens),
        }
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "model": gen.model,
        "status": status,
        "incomplete_details": (None if not done or complete else {"reason": "max_output_tokens"}),
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata"),
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "temperature": body.get("temperature", 1.0),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "text": body.get("text"),
        "reasoning": body.get("reasoning"),
        "service_tier": "auto",
        "background": False,
        "user": body.get("user"),
        "usage": usage,
    }


async def responses(server: _MockServer, request: Request) -> Response:
    body = await _json_body(request)
    model = server._model(body)
    turns = _items(body.get("input"), "input")
    if isinstance(body.get("instructions"), str):
        turns.insert(0, ("system", body["instructions"]))
    gen = _Generation(model, turns, _int_param(body, "max_output_tokens", 1))
    await server._admit(request, gen.markers)
    start = time.monotonic()
    rid, mid = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    if body.get("stream"):
        events = _batched(_response_events(server, start, body, gen, rid, mid))
        return StreamingResponse(events, media_type="text/event-stream")
    await _finish_whole(server, request, start, gen)
    return JSONResponse(_response(body, gen, rid, mid, done=True))


async def _finish_whole(
    server: _MockServer, request: Request, start: float, gen: _Generation
) -> None:
    """Wait as long as generating the whole answer takes (or fail where a marker says)."""
    steps = len(gen.tokens)
    if gen.markers.error_after is not None:
        steps = min(steps, gen.markers.error_after)
    await server._sleep_until(request, server._due(start, gen.markers, steps))
    if gen.markers.error_after is not None:
        message = "Mock engine failure mid-generation (injected)."
        raise _APIError(500, message, "InternalServerError")


async def _response_events(
    server: _MockServer,
    start: float,
    body: dict[str, Any],
    gen: _Generation,
    rid: str,
    mid: str,
) -> AsyncIterator[str]:
    seq = 0

    def event(kind: str, **data: Any) -> str:
        nonlocal seq
        seq += 1
        return _event(kind, {"type": kind, "sequence_number": seq - 1, **data})

    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    pending = _response(body, gen, rid, mid, done=False)
    yield event("response.created", response=pending)
    yield event("response.in_progress", response=pending)
    item = {"id": mid, "type": "message", "role": "assistant", "status": "in_progress"}
    yield event("response.output_item.added", output_index=0, item={**item, "content": []})
    empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield event("response.content_part.added", **where, part=empty)
    async for _, token in _paced(server, start, gen.markers, gen.tokens):
        yield event("response.output_text.delta", **where, delta=token, logprobs=[])
    if gen.markers.error_after is not None:
        error = _APIError(500, "Mock engine failure mid-stream (injected).", "InternalServerError")
        yield f"data: {json.dumps(error.body())}\n\n"
        return
    yield event("response.output_text.done", **where, text=gen.text, logprobs=[])
    part = {**empty, "text": gen.text}
    yield event("response.content_part.done", **where, part=part)
    done_item = {**item, "status": "completed", "content": [part]}
    yield event("response.output_item.done", output_index=0, item=done_item)
    final = _response(body, gen, rid, mid, done=True)
    kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
    yield event(kind, response=final)


# ---- Anthropic's Messages API -------------------------------------------------------------------


def anthropic_errors(
    handler: Callable[[_MockServer, Request], Any], server: _MockServer
) -> Callable[[Request], Any]:
    """The route's errors in Anthropic's shape, `{"type": "error", "error": {type, message}}`."""

    async def guarded(request: Request) -> Response:
        key = server.config.api_key
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse(_anthropic_error(401, "Unauthorized"), status_code=401)
        try:
            response: Response = await handler(server, request)
            return response
        except _APIError as e:
            return JSONResponse(_anthropic_error(e.status, e.message), status_code=e.status)

    return guarded


def _anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = _ANTHROPIC_ERRORS.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _message(gen: _Generation, mid: str, done: bool) -> dict[str, Any]:
    stop = ("end_turn" if gen.finish == "stop" else "max_tokens") if done else None
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": gen.model,
        "content": [{"type": "text", "text": gen.text}] if done else [],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": gen.prompt_tokens,
            "output_tokens": len(gen.tokens) if done else 0,
        },
    }


async def messages(server: _MockServer, request: Request) -> Response:
    body = await _json_body(request)
    model = server._model(body)
    max_tokens = _int_param(body, "max_tokens", 1)
    if max_tokens is None:
        raise _bad_request("max_tokens: Field required", "max_tokens")
    turns = _items(body.get("messages"), "messages")
    system = body.get("system")
    if system:
        turns.insert(0, ("system", _content_text(system)))
    gen = _Generation(model, turns, max_tokens)
    await server._admit(request, gen.markers)
    start = time.monotonic()
    mid = f"msg_{uuid.uuid4().hex}"
    if body.get("stream"):
        events = _batched(_message_events(server, start, gen, mid))
        return StreamingResponse(events, media_type="text/event-stream")
    await _finish_whole(server, request, start, gen)
    return JSONResponse(_message(gen, mid, done=True))


async def _message_events(
    server: _MockServer, start: float, gen: _Generation, mid: str
) -> AsyncIterator[str]:
    def event(kind: str, **data: Any) -> str:
        return _event(kind, {"type": kind, **data})

    yield event("message_start", message=_message(gen, mid, done=False))
    yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
    async for _, token in _paced(server, start, gen.markers, gen.tokens):
        yield event("content_block_delta", index=0, delta={"type": "text_delta", "text": token})
    if gen.markers.error_after is not None:
        error = _anthropic_error(500, "Mock engine failure mid-stream (injected).")
        yield _event("error", error)
        return
    yield event("content_block_stop", index=0)
    final = _message(gen, mid, done=True)
    delta = {"stop_reason": final["stop_reason"], "stop_sequence": None}
    yield event("message_delta", delta=delta, usage={"output_tokens": len(gen.tokens)})
    yield event("message_stop")
