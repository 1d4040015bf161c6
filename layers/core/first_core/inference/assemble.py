"""A finished stream's whole answer, as the non-streamed completion it adds up to
(`GET /v1/requests/{id}` for a client whose stream was cut).

`compute_funcs/streaming.py` assembles the same answer for its return value; it ships alone to
the clusters and cannot import this, so a unit test holds the two twins equal.
"""

from __future__ import annotations

import json
from typing import Any

from first_core.schemas.wire import chunk_error
from first_core.tables import StreamChunkBatch


def answer(request_id: str, openai_path: str) -> dict[str, Any]:
    """The non-streamed answer a finished stream adds up to, from its stored chunk batches: what
    a client whose connection dropped reads back later."""
    chunks = [
        chunk
        for row in StreamChunkBatch.query(request_id, consistent_read=True)  # in seq order
        for chunk in row.chunks
    ]
    return assemble(openai_path, chunks)


def assemble(openai_path: str, chunks: list[str]) -> dict[str, Any]:
    """`chat.completion` or `text_completion` from a stream's `data:` payloads (a Responses API
    `response`, an Anthropic `message` for those routes' named events).

    compute_funcs/streaming.py assembles the same answer for its return value (it ships alone to
    the clusters and cannot import this); tests/unit/compute_funcs/test_streaming.py checks the two
    agree on the mock vLLM's streams.
    """
    route = openai_path.strip("/")
    if route == "responses":
        return _response(chunks)
    if route == "messages":
        return _message(chunks)
    chat = route.endswith("chat/completions")
    head: dict[str, Any] = {}
    usage: Any = None
    choices: dict[int, dict[str, Any]] = {}
    for text in chunks:
        chunk = json.loads(text)
        if not isinstance(chunk, dict) or chunk_error(chunk) is not None:
            continue
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in chunk and key not in head:
                head[key] = chunk[key]
        usage = chunk.get("usage") or usage
        for part in chunk.get("choices") or []:
            _fold(choices.setdefault(part.get("index", 0), _empty_choice()), part, chat)
    out = [_choice_answer(index, choice, chat) for index, choice in sorted(choices.items())]
    kind = "chat.completion" if chat else "text_completion"
    return {**head, "object": kind, "choices": out, "usage": usage}


def _empty_choice() -> dict[str, Any]:
    return {
        "parts": [],
        "reasoning": [],
        "tools": {},
        "role": "assistant",
        "logprobs": None,
        "finish_reason": None,
        "stop_reason": None,
    }


def _fold(choice: dict[str, Any], part: dict[str, Any], chat: bool) -> None:
    """Add one chunk's choice to what the choice holds so far."""
    delta = part.get("delta") or {}
    choice["role"] = delta.get("role") or choice["role"]
    choice["parts"].append((delta.get("content") if chat else part.get("text")) or "")
    choice["reasoning"].append(delta.get("reasoning_content") or "")
    for call in delta.get("tool_calls") or []:
        slot = choice["tools"].setdefault(
            call.get("index", 0),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        slot["id"] = call.get("id") or slot["id"]
        function = call.get("function") or {}
        slot["function"]["name"] += function.get("name") or ""
        slot["function"]["arguments"] += function.get("arguments") or ""
    if isinstance(part.get("logprobs"), dict):
        merged = choice["logprobs"] = choice["logprobs"] or {}
        for key, value in part["logprobs"].items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            else:
                merged[key] = value
    for key in ("finish_reason", "stop_reason"):
        if part.get(key) is not None:
            choice[key] = part[key]


def _choice_answer(index: int, choice: dict[str, Any], chat: bool) -> dict[str, Any]:
    text = "".join(choice["parts"])
    if chat:
        calls = [call for _, call in sorted(choice["tools"].items())]
        message: dict[str, Any] = {"role": choice["role"], "content": text, "tool_calls": calls}
        if any(choice["reasoning"]):
            message["reasoning_content"] = "".join(choice["reasoning"])
        content: dict[str, Any] = {"message": message}
    else:
        content = {"text": text}
    return {
        "index": index,
        **content,
        "logprobs": choice["logprobs"],
        "finish_reason": choice["finish_reason"],
        "stop_reason": choice["stop_reason"],
    }


def _response(chunks: list[str]) -> dict[str, Any]:
    """The `response` of the stream's last `response.*` event that carries one: the terminal
    event's (`response.completed`) is the whole answer."""
    response: dict[str, Any] = {"object": "response", "output": [], "usage": None}
    for text in chunks:
        chunk = json.loads(text)
        if isinstance(chunk, dict) and isinstance(chunk.get("response"), dict):
            response = chunk["response"]
    return response


def _message(chunks: list[str]) -> dict[str, Any]:
    """Anthropic's `message`, rebuilt from `message_start`, the content blocks' events and
    `message_delta` (whose usage has the output tokens)."""
    message: dict[str, Any] = {"type": "message", "role": "assistant", "content": []}
    blocks: dict[int, dict[str, Any]] = {}
    for text in chunks:
        chunk = json.loads(text)
        kind = chunk.get("type") if isinstance(chunk, dict) else None
        if kind == "message_start":
            message = {**message, **chunk.get("message", {})}
        elif kind == "content_block_start":
            blocks[chunk.get("index", 0)] = dict(chunk.get("content_block") or {})
        elif kind == "content_block_delta":
            block = blocks.setdefault(chunk.get("index", 0), {"type": "text", "text": ""})
            delta = chunk.get("delta") or {}
            for key in ("text", "thinking", "partial_json", "signature"):
                if isinstance(delta.get(key), str):
                    block[key] = block.get(key, "") + delta[key]
        elif kind == "message_delta":
            message.update(chunk.get("delta") or {})
            usage = {k: v for k, v in (chunk.get("usage") or {}).items() if v is not None}
            message["usage"] = {**(message.get("usage") or {}), **usage}
    content = []
    for _, block in sorted(blocks.items()):
        partial = block.pop("partial_json", None)
        if partial is not None:  # a tool call's input, streamed as JSON text
            try:
                block["input"] = json.loads(partial) if partial else {}
            except ValueError:
                block["input"] = partial
        content.append(block)
    message["content"] = content
    return message
