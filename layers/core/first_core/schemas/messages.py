"""Chat messages and their content parts, as OpenAI's chat completions API takes them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Tag

from first_core.schemas._unions import _TAG, _by_key, _by_shape, _Strict

# ---- message content -------------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str
    format: Literal["wav", "mp3"]


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(_Strict):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(_Strict):
    type: Literal["file"]
    file: FileRef


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


TextContent = Annotated[
    Annotated[str, Tag(_TAG + "string")] | Annotated[list[TextPart], Tag(_TAG + "array")],
    _by_shape("a string or an array of text parts"),
]
UserPart = Annotated[
    Annotated[TextPart, Tag(_TAG + "text")]
    | Annotated[ImagePart, Tag(_TAG + "image_url")]
    | Annotated[AudioPart, Tag(_TAG + "input_audio")]
    | Annotated[FilePart, Tag(_TAG + "file")],
    _by_key("type", "text", "image_url", "input_audio", "file"),
]
UserContent = Annotated[
    Annotated[str, Tag(_TAG + "string")] | Annotated[list[UserPart], Tag(_TAG + "array")],
    _by_shape("a string or an array of content parts"),
]
AssistantPart = Annotated[
    Annotated[TextPart, Tag(_TAG + "text")] | Annotated[RefusalPart, Tag(_TAG + "refusal")],
    _by_key("type", "text", "refusal"),
]
AssistantContent = Annotated[
    Annotated[str, Tag(_TAG + "string")] | Annotated[list[AssistantPart], Tag(_TAG + "array")],
    _by_shape("a string or an array of text or refusal parts"),
]


# ---- messages --------------------------------------------------------------------------------


class SystemMessage(_Strict):
    role: Literal["system"]
    content: TextContent
    name: str | None = None


class DeveloperMessage(_Strict):
    role: Literal["developer"]
    content: TextContent
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: UserContent
    name: str | None = None


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AudioRef(_Strict):
    id: str


class AssistantMessage(_Strict):
    # Besides OpenAI's fields: what the SDK sends back when a client appends the assistant
    # message of a vLLM response to its history (`function_call`, `annotations` and the
    # reasoning fields, often null).
    role: Literal["assistant"]
    content: AssistantContent | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    audio: AudioRef | None = None
    annotations: list[dict[str, Any]] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str


Message = Annotated[
    Annotated[SystemMessage, Tag(_TAG + "system")]
    | Annotated[DeveloperMessage, Tag(_TAG + "developer")]
    | Annotated[UserMessage, Tag(_TAG + "user")]
    | Annotated[AssistantMessage, Tag(_TAG + "assistant")]
    | Annotated[ToolMessage, Tag(_TAG + "tool")],
    _by_key("role", "system", "developer", "user", "assistant", "tool"),
]
