"""vLLM's own request parameters: what its OpenAI server documents beyond OpenAI's ("extra params"
of vllm/entrypoints/openai/protocol.py), as mixins of the request bodies in `requests`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, StringConstraints, Tag, model_validator

from first_core.schemas._unions import _TAG, _by_shape, _invalid, _Strict

TokenId = Annotated[int, Field(ge=0)]

# They reach vLLM unchanged (the gateway forwards the body it was sent); the types and ranges
# here are vLLM's, so a bad value is a 400 naming the param before a cluster job is spent on it.

GuidedJson = Annotated[
    Annotated[str, Tag(_TAG + "string")] | Annotated[dict[str, Any], Tag(_TAG + "object")],
    _by_shape("a JSON schema (an object, or a string holding one)"),
]
LogitsProcessor = Annotated[
    Annotated[str, Tag(_TAG + "string")] | Annotated[dict[str, Any], Tag(_TAG + "object")],
    _by_shape("a qualified name or an object with 'qualname'"),
]
XArg = Annotated[
    Annotated[str, Tag(_TAG + "string")] | Annotated[float, Tag(_TAG + "number")],
    Discriminator(
        lambda v: _TAG + ("string" if isinstance(v, str) else "number"),
        custom_error_type="first_shape",
        custom_error_message="a string or a number",
    ),
]


class VllmCommon(_Strict):
    """vLLM's parameters of every route: scheduling, tokenization and request identity."""

    priority: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    request_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    add_special_tokens: bool | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    cache_salt: Annotated[str, StringConstraints(min_length=1)] | None = None


class VllmGeneration(VllmCommon):
    """vLLM's sampling, structured-output and extension parameters (chat and completions)."""

    use_beam_search: bool | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 (or 0): every token
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    length_penalty: float | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=-1)] | None = None  # -1: the whole vocabulary
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    bad_words: list[str] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: GuidedJson | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None
    structural_tag: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    logits_processors: list[LogitsProcessor] | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, XArg] | None = None


class StructuralTag(_Strict):
    begin: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    end: str


class StructuralTagFormat(_Strict):
    """vLLM's: the legacy `structures` + `triggers`, or the newer `format`."""

    type: Literal["structural_tag"]
    structures: list[StructuralTag] | None = None
    triggers: list[str] | None = None
    format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> StructuralTagFormat:
        if self.format is None and (self.structures is None or self.triggers is None):
            raise _invalid("needs 'format', or 'structures' and 'triggers'")
        return self
