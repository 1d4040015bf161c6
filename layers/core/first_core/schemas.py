"""Validation of the request bodies the gateway accepts, before anything is sent to a cluster.

The rules are those of the reference FIRST gateway (its fixtures are the conformance suite),
which follow OpenAI's API: unknown keys are refused at every level, types are strict (no
"1.2" for a number, no 1 for a boolean), and ranges are OpenAI's. A refusal names the offending
field the way OpenAI does (`messages.0.content`), never with pydantic's own wording.

Every union is discriminated by a function that looks at the raw JSON value, so a wrong value
yields one error on the branch the client meant instead of one per branch. Those branches carry
tags starting with `_TAG`, which are dropped again when an error location becomes a `param`.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from first_core.errors import InvalidRequestError

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "FirstBatchRequest",
    "Kind",
    "RequestBody",
    "StreamOptions",
    "parse_request",
]

Kind = Literal["chat/completions", "completions", "embeddings", "batches"]

_TAG = "§"
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOKEN_ID = re.compile(r"[0-9]+")
_PLURAL = re.compile(r"\b(\d+)( \w+)\(s\)")


def _invalid(detail: str, at: str | int | None = None) -> PydanticCustomError:
    # `at` extends the error location, for checks that run on a whole object or list.
    return PydanticCustomError("first_value", "{detail}", {"detail": detail, "at": at})


def _shape(value: Any) -> str | None:
    if isinstance(value, list):
        first = value[0] if value else None
        if isinstance(first, list):
            return _TAG + "token-arrays"
        if isinstance(first, int) and not isinstance(first, bool):
            return _TAG + "tokens"
        return _TAG + "array"
    if isinstance(value, str):
        return _TAG + "string"
    return _TAG + "object" if isinstance(value, dict) else None


def _by_shape(expected: str) -> Discriminator:
    # No custom_error_context: it would make the Annotated metadata unhashable for Union.
    return Discriminator(_shape, custom_error_type="first_shape", custom_error_message=expected)


def _by_key(key: str, *choices: str) -> Discriminator:
    def choose(value: Any) -> str | None:
        tag = value.get(key) if isinstance(value, dict) else None
        return _TAG + tag if isinstance(tag, str) and tag in choices else None

    expected = "one of " + ", ".join(f"'{c}'" for c in choices)
    return Discriminator(
        choose, custom_error_type="first_tag:" + key, custom_error_message=expected
    )


def _function_name(name: str) -> str:
    if not _FUNCTION_NAME.fullmatch(name):
        raise _invalid("must be 1 to 64 characters among a-z, A-Z, 0-9, '_' and '-'")
    return name


def _token_id_key(key: str) -> str:
    if not _TOKEN_ID.fullmatch(key):
        raise _invalid("keys must be token ids (non-negative integers)")
    return key


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


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


# ---- tools, output formats and options ----------------------------------------------------------


class FunctionDef(_Strict):
    name: Annotated[str, AfterValidator(_function_name)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag(_TAG + "string")]
    | Annotated[NamedToolChoice, Tag(_TAG + "object")],
    _by_shape("'none', 'auto', 'required' or an object naming a function"),
]


class JsonSchema(_Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    description: str | None = None
    # `schema` would shadow a BaseModel attribute; dump with by_alias=True to forward it.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag(_TAG + "text")]
    | Annotated[JsonObjectFormat, Tag(_TAG + "json_object")]
    | Annotated[JsonSchemaFormat, Tag(_TAG + "json_schema")],
    _by_key("type", "text", "json_object", "json_schema"),
]


class Prediction(_Strict):
    type: Literal["content"]
    content: Annotated[
        Annotated[str, Tag(_TAG + "string")] | Annotated[list[TextPart], Tag(_TAG + "array")],
        _by_shape("a string or an array of text parts"),
    ]


class ApproximateLocation(_Strict):
    city: str | None = None
    country: str | None = None
    region: str | None = None
    timezone: str | None = None


class UserLocation(_Strict):
    type: Literal["approximate"]
    approximate: ApproximateLocation


class WebSearchOptions(_Strict):
    search_context_size: Literal["low", "medium", "high"] | None = None
    user_location: UserLocation | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ExtraBody(_Strict):
    """FIRST's one vLLM extension: a literal `extra_body` key (not the SDK's merged extras)."""

    use_beam_search: bool


TokenId = Annotated[int, Field(ge=0)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
LogitBias = dict[
    Annotated[str, AfterValidator(_token_id_key)], Annotated[float, Field(ge=-100, le=100)]
]
Stop = Annotated[
    Annotated[str, Tag(_TAG + "string")]
    | Annotated[list[str], Field(min_length=1, max_length=4), Tag(_TAG + "array")],
    _by_shape("a string or an array of strings"),
]
TextsOrTokens = Annotated[
    Annotated[str, Tag(_TAG + "string")]
    | Annotated[list[str], Field(min_length=1), Tag(_TAG + "array")]
    | Annotated[list[TokenId], Field(min_length=1), Tag(_TAG + "tokens")]
    | Annotated[
        list[Annotated[list[TokenId], Field(min_length=1)]],
        Field(min_length=1),
        Tag(_TAG + "token-arrays"),
    ],
    _by_shape(
        "a string, an array of strings, an array of token ids or an array of token-id arrays"
    ),
]
Metadata = Annotated[
    dict[
        Annotated[str, StringConstraints(max_length=64)],
        Annotated[str, StringConstraints(max_length=512)],
    ],
    Field(max_length=16),
]


# ---- request bodies ----------------------------------------------------------------------------


class RequestBody(_Strict):
    model: Annotated[str, StringConstraints(min_length=1)]

    def wants_stream(self) -> bool:
        return False

    def max_output_tokens(self) -> int | None:
        return None


class _GenerationRequest(RequestBody):
    """What chat and text completions share: streaming and sampling."""

    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: Stop | None = None
    user: str | None = None

    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream_is_no_stream(cls, value: Any) -> Any:
        # The SDK sends `"stream": null` when a caller passes stream=None.
        return False if value is None else value

    def wants_stream(self) -> bool:
        return self.stream

    def max_output_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = (
        None
    )
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    store: bool | None = None
    metadata: Metadata | None = None
    modalities: (
        Annotated[list[Literal["text", "audio"]], Field(min_length=1, max_length=2)] | None
    ) = None
    prediction: Prediction | None = None
    web_search_options: WebSearchOptions | None = None
    extra_body: ExtraBody | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _invalid("'logprobs' must be true when 'top_logprobs' is set", "top_logprobs")
        return self

    def max_output_tokens(self) -> int | None:
        # vLLM, like OpenAI, prefers the newer name when both are given.
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(_GenerationRequest):
    prompt: TextsOrTokens
    best_of: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    suffix: str | None = None


class EmbeddingRequest(RequestBody):
    input: TextsOrTokens
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _at_most_2048(cls, value: str | list[Any]) -> str | list[Any]:
        # OpenAI's limit, kept by FIRST: no array (of inputs or of tokens) beyond 2048 items.
        if isinstance(value, list):
            if len(value) > 2048:
                raise _invalid(f"must have at most 2048 items (got {len(value)})")
            for i, item in enumerate(value):
                if isinstance(item, list) and len(item) > 2048:
                    raise _invalid(f"must have at most 2048 tokens (got {len(item)})", i)
        return value


class FirstBatchRequest(RequestBody):
    """FIRST's own batch submission: a JSONL file already on the cluster's file system."""

    input_file: Annotated[str, StringConstraints(min_length=1)]
    output_folder_path: str | None = None


_MODELS: dict[str, type[RequestBody]] = {
    "chat/completions": ChatCompletionRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
    "batches": FirstBatchRequest,
}


def parse_request(kind: Kind, body: bytes | str | dict[str, Any]) -> RequestBody:
    """Validate a request body, or raise `InvalidRequestError` naming the first bad field."""
    model = _MODELS[kind]
    if isinstance(body, dict):
        data: Any = body
    else:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidRequestError(
                "The request body is not valid JSON.", code="invalid_json"
            ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _to_gateway_error(exc.errors(include_url=False)[0]) from exc


# ---- pydantic errors to OpenAI errors -----------------------------------------------------------

_EXPECTED_TYPE = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}
_DETAIL = {
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "greater_than": "must be greater than {gt}",
    "less_than": "must be less than {lt}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must be at least {min_length} character(s) long",
    "string_too_long": "must be at most {max_length} character(s) long",
    "literal_error": "must be {expected}",
    "finite_number": "must be a finite number",
    "first_value": "{detail}",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "an integer" if isinstance(value, int) else "a decimal number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) > 40:
        value = value[:40] + "..."
    return json.dumps(value, ensure_ascii=False, default=str)


def _path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith(_TAG)))


def _to_gateway_error(err: ErrorDetails) -> InvalidRequestError:
    kind, loc, got = err["type"], err["loc"], err["input"]
    # 2.0 reads as a float limit; the client sent or should send 2.
    ctx = {
        k: int(v) if isinstance(v, float) and v.is_integer() else v
        for k, v in (err.get("ctx") or {}).items()
    }

    if kind == "extra_forbidden":
        path = ".".join(filter(None, [_path(loc[:-1]), str(loc[-1])]))
        message = (
            f"Unrecognized request argument supplied: {path}"
            if len(loc) == 1
            else f"Unrecognized parameter: '{path}'."
        )
        return InvalidRequestError(message, param=path, code="unknown_parameter")

    # A dict key that fails is reported against the dict, naming the key in the message.
    bad_key = loc[-2] if len(loc) >= 2 and loc[-1] == "[key]" else None
    path = _path(loc[:-2] if bad_key is not None else loc)
    if ctx.get("at") is not None:
        path = f"{path}.{ctx['at']}" if path else str(ctx["at"])

    if kind.startswith("first_tag:"):  # the tag of a union is missing or unknown
        key = kind.partition(":")[2]
        if not isinstance(got, dict):
            kind = "model_type"
        elif got.get(key) is None:
            kind, path = "missing", f"{path}.{key}"
        else:
            kind, path, got = "literal_error", f"{path}.{key}", got[key]
            ctx = {"expected": err["msg"]}
    if kind == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{path}'.",
            param=path,
            code="missing_required_parameter",
        )
    if kind in _EXPECTED_TYPE or kind == "first_shape":
        expected = err["msg"] if kind == "first_shape" else _EXPECTED_TYPE[kind]
        return InvalidRequestError(
            f"Invalid type for '{path}': expected {expected}, but got {_json_type(got)}.",
            param=path,
            code="invalid_type",
        )

    detail = _DETAIL[kind].format(**ctx) if kind in _DETAIL else err["msg"].lower()
    if bad_key is not None:
        message = f"Invalid key in '{path}': {detail} (got {_show(bad_key)})."
    else:
        # Arrays and objects are not quoted back, only their size when that is the problem.
        if isinstance(got, list | dict):
            shown = f"{len(got)} item(s)" if kind in ("too_short", "too_long") else None
        elif isinstance(got, str) and kind.startswith("string_too"):
            shown = f"{len(got)} character(s)"
        else:
            shown = _show(got)
        message = f"Invalid value for '{path}': {detail}" + (f" (got {shown})." if shown else ".")
    plural = _PLURAL.sub(lambda m: m[1] + m[2] + ("" if m[1] == "1" else "s"), message)
    return InvalidRequestError(plural, param=path, code="invalid_value")
