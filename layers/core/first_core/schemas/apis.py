"""The request bodies of the two APIs besides OpenAI's chat that vLLM serves: OpenAI's Responses
API (`POST /v1/responses`) and Anthropic's Messages API (`POST /v1/messages`).

Their top-level keys are checked as strictly as chat's (an unknown key is a 400 naming it), with
vLLM's own extras; what lies inside `input`, `messages`, `tools` and the like (many item types,
growing with each API version) is left for vLLM to judge, which answers a 400 of its own.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StringConstraints, field_validator

from first_core.schemas.requests import Metadata, RequestBody, StreamOptions

_Item = dict[str, Any]


def _null_is_false(value: Any) -> Any:
    # The SDKs send `"stream": null` when a caller passes stream=None.
    return False if value is None else value


def _parts(content: Any) -> list[Any]:
    return content if isinstance(content, list) else []


class ResponsesRequest(RequestBody):
    """OpenAI's Responses API request, as vLLM's `/v1/responses` takes it."""

    max_tokens_key: ClassVar[str] = "max_output_tokens"

    model: Annotated[str, StringConstraints(min_length=1)]
    input: Annotated[str, StringConstraints(min_length=0)] | list[_Item]
    instructions: str | None = None
    # Named apart: `max_output_tokens()` is RequestBody's method (the cap's and the fill-in's).
    output_token_limit: Annotated[int, Field(ge=1)] | None = Field(
        default=None, alias="max_output_tokens"
    )
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[_Item], Field(max_length=128)] | None = None
    tool_choice: str | _Item | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None
    text: _Item | None = None
    reasoning: _Item | None = None
    metadata: Metadata | None = None
    stream: bool = False
    stream_options: StreamOptions | _Item | None = None
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    conversation: str | _Item | None = None
    prompt: _Item | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    include: list[str] | None = None
    # vLLM's own: sampling, scheduling and caching (vllm/entrypoints/openai/protocol.py).
    top_k: int | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    priority: int | None = None
    request_id: str | None = None
    cache_salt: str | None = None
    mm_processor_kwargs: _Item | None = None
    vllm_xargs: _Item | None = None
    enable_response_messages: bool | None = None
    previous_input_messages: list[_Item] | None = None

    _stream = field_validator("stream", mode="before")(_null_is_false)

    def wants_stream(self) -> bool:
        return self.stream

    def max_output_tokens(self) -> int | None:
        return self.output_token_limit

    def refers_to_media(self) -> bool:
        # Input items may be images or files (a URL or an id: few bytes, many tokens).
        if isinstance(self.input, str):
            return False
        return any(
            isinstance(part, dict)
            and str(part.get("type", "")).startswith("input_")
            and part.get("type") != "input_text"
            for item in self.input
            for part in _parts(item.get("content"))
        )


class MessagesRequest(RequestBody):
    """Anthropic's Messages API request, as vLLM's `/v1/messages` takes it."""

    model: Annotated[str, StringConstraints(min_length=1)]
    messages: Annotated[list[_Item], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)]
    system: str | list[_Item] | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    tools: Annotated[list[_Item], Field(max_length=128)] | None = None
    tool_choice: _Item | None = None
    metadata: _Item | None = None
    thinking: _Item | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    container: str | None = None
    mcp_servers: list[_Item] | None = None

    _stream = field_validator("stream", mode="before")(_null_is_false)

    def wants_stream(self) -> bool:
        return self.stream

    def max_output_tokens(self) -> int | None:
        return self.max_tokens

    def refers_to_media(self) -> bool:
        return any(
            isinstance(part, dict) and part.get("type") in ("image", "document")
            for message in self.messages
            for part in _parts(message.get("content"))
        )
