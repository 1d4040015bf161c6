"""The request bodies of the inference routes and of FIRST's batches, and `parse_request`.

Long because: every field OpenAI documents for chat, completions and embeddings is spelled out
with its range (vLLM's own are in `schemas.vllm`, the Responses and Messages APIs in
`schemas.apis`), so a mistake is answered naming the field."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from first_core.edge import load_json
from first_core.errors import InvalidRequestError
from first_core.schemas._unions import (
    _TAG,
    _by_key,
    _by_shape,
    _function_name,
    _invalid,
    _Strict,
    _token_id_key,
)
from first_core.schemas.errors import to_gateway_error
from first_core.schemas.messages import Message, TextPart
from first_core.schemas.vllm import StructuralTagFormat, VllmCommon, VllmGeneration

Kind = Literal[
    "chat/completions", "completions", "embeddings", "responses", "messages", "batches"
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
    | Annotated[JsonSchemaFormat, Tag(_TAG + "json_schema")]
    | Annotated[StructuralTagFormat, Tag(_TAG + "structural_tag")],
    _by_key("type", "text", "json_object", "json_schema", "structural_tag"),
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
    # vLLM's: usage on every chunk (the running count), not only in the last one.
    continuous_usage_stats: bool = False


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
    # The body's key for the most tokens to generate: the gateway fills it in when left out.
    max_tokens_key: ClassVar[str] = "max_tokens"

    model: Annotated[str, StringConstraints(min_length=1)]

    def wants_stream(self) -> bool:
        return False

    def max_output_tokens(self) -> int | None:
        return None

    def sequences(self) -> int:
        """How many sequences the backend generates, each up to `max_output_tokens()`."""
        return 1

    def refers_to_media(self) -> bool:
        """Whether the prompt points at an image, audio or a file: those count many prompt
        tokens in few bytes (a URL, an id), so the body's size bounds no prompt."""
        return False


class _GenerationRequest(VllmGeneration, RequestBody):
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

    def sequences(self) -> int:
        return self.n or 1


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
    # vLLM's, for chat only: the chat template and what it is given.
    best_of: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _invalid("'logprobs' must be true when 'top_logprobs' is set", "top_logprobs")
        return self

    def refers_to_media(self) -> bool:
        for message in self.messages:
            if getattr(message, "audio", None) is not None:  # an earlier answer's audio
                return True
            content = getattr(message, "content", None)
            if isinstance(content, list) and any(
                getattr(part, "type", "text") not in ("text", "refusal") for part in content
            ):
                return True
        return False

    def max_output_tokens(self) -> int | None:
        # vLLM, like OpenAI, prefers the newer name when both are given.
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def sequences(self) -> int:
        # best_of candidates are generated too (at least n of them).
        return max(self.n or 1, self.best_of or 1)


class CompletionRequest(_GenerationRequest):
    prompt: TextsOrTokens
    best_of: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    suffix: str | None = None
    response_format: ResponseFormat | None = None  # vLLM's, as in chat

    def sequences(self) -> int:
        # vLLM, like OpenAI, answers `n` choices for each prompt of a list.
        prompts = 1
        if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int):
            prompts = len(self.prompt)
        # best_of candidates are generated too (at least n of them).
        return max(self.n or 1, self.best_of or 1) * prompts


class EmbeddingRequest(VllmCommon, RequestBody):
    input: TextsOrTokens
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None
    # vLLM's: pooling and its output.
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    normalize: bool | None = None
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] | None = None
    additional_data: Any = None

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
# "responses" and "messages": schemas/apis.py, which builds on this module (the package adds them).


def parse_request(kind: Kind, body: Any) -> RequestBody:
    """Validate a request body (its raw bytes or text, or the JSON already parsed from them),
    or raise `InvalidRequestError` naming the first bad field."""
    model = _MODELS[kind]
    if isinstance(body, bytes | str):
        data: Any = load_json(body)  # 400 for bad JSON, and for a lone surrogate in any string
    else:
        data = body
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise to_gateway_error(exc.errors(include_url=False)[0]) from exc
