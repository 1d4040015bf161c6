"""What the compute functions post to the callback routes, and return to Globus Compute.

The contract with `compute_funcs/` (inference.py, streaming.py, batch.py), which ship alone to
the clusters and cannot import this: their module docstrings say the same from their side
(`compute_funcs/batch.py`'s is the whole batch protocol). Unknown fields are ignored, so a newer
function may add some; each field's range is checked: to what a compute function could have
sent (strict integers, no negatives, no number DynamoDB would refuse), so a cluster-side bug or
a leaked callback token cannot corrupt accounting. What depends on the request (its max_tokens,
its batch's lines) is checked against its record by the callback routes (first_core.callbacks).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from first_core.usage import Usage

# No count a backend produces comes near this; DynamoDB numbers hold 38 digits, and a JSON
# reader keeps integers exact up to 2**53.
MAX_COUNT = 10**15
# A stream's batches carry at least one chunk each but the last: a million is a stream no
# model produces, and keeps the reconciler's gap filling bounded.
MAX_SEQ = 1_000_000

Count = Annotated[int, Strict(), Field(ge=0, le=MAX_COUNT)]
Seq = Annotated[int, Strict(), Field(ge=0, le=MAX_SEQ)]
# An HTTP status: a JSON integer, not "200", 200.5 or true.
StatusCode = Annotated[int, Strict(), Field(ge=100, le=599)]


class CallbackBody(BaseModel):
    """What a compute function posts back (and returns to Globus Compute)."""

    model_config = ConfigDict(extra="ignore")

    request_id: str
    status_code: StatusCode
    body: Any = None


def chunk_error(chunk: str | dict[str, Any]) -> dict[str, Any] | None:
    """The error a stream chunk carries, or None: a chunk is one of vLLM's SSE `data:` payloads,
    and an error one is `{"error": {...}}` with no `choices` (vLLM's error event, and the last
    chunk of a failed stream's done batch). The one test of "is this chunk an error?"."""
    data: Any = chunk
    if isinstance(chunk, str):
        if '"error"' not in chunk:
            return None
        try:
            data = json.loads(chunk)
        except ValueError:
            return None
    if isinstance(data, dict) and "choices" not in data and isinstance(data.get("error"), dict):
        return dict(data["error"])
    return None


class StreamError(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message: str
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class StreamUsage(BaseModel):
    """Token counts as vLLM reports them (a stream's done batch, an answer's `usage`); a count
    given as null is 0, as it is when left out. The Responses and Messages APIs say
    `input_tokens` and `output_tokens`: read as prompt and completion tokens."""

    model_config = ConfigDict(extra="ignore")

    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    total_tokens: Count | None = None

    @model_validator(mode="before")
    @classmethod
    def _input_output_names(cls, value: Any) -> Any:
        if isinstance(value, dict) and "prompt_tokens" not in value and (
            "input_tokens" in value or "output_tokens" in value
        ):
            return {
                "prompt_tokens": value.get("input_tokens"),
                "completion_tokens": value.get("output_tokens"),
                "total_tokens": value.get("total_tokens"),
            }
        return value

    @field_validator("prompt_tokens", "completion_tokens", mode="before")
    @classmethod
    def _null_is_zero(cls, value: Any) -> Any:
        return 0 if value is None else value

    def to_usage(self) -> Usage:
        total = self.total_tokens
        if total is None:
            total = self.prompt_tokens + self.completion_tokens
        return Usage(self.prompt_tokens, self.completion_tokens, total)


class StreamBatchBody(BaseModel):
    """What the streaming compute function posts to the stream callback."""

    model_config = ConfigDict(extra="ignore")

    request_id: str
    seq: Seq
    chunks: list[str] = Field(default_factory=list)
    done: bool = False
    error: StreamError | None = None
    usage: StreamUsage | None = None


class Counts(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lines: Count = 0
    bytes: Count = 0
    path: str | None = None


class BatchEvent(BaseModel):
    """What the batch function posts (and, for `done`, returns to Globus Compute)."""

    model_config = ConfigDict(extra="ignore")

    batch_id: str
    event: Literal["progress", "upload", "done", "tokens"]
    attempt: Annotated[int, Strict(), Field(ge=1, le=MAX_SEQ)]
    # `tokens`: what the next lines may use at most, and what the lines of the last grant used.
    want: Count = 0
    used: Count | None = None
    completed: Count = 0
    failed: Count = 0
    total: Count = 0
    resumed_lines: Count = 0
    outcome: Literal["completed", "cancelled", "failed"] | None = None
    usage: dict[str, Count] = Field(default_factory=dict)
    output: Counts = Counts()
    errors: Counts = Counts()
    error: dict[str, Any] | None = None


def answer_usage(body: Any) -> Usage | None:
    """The `usage` of an OpenAI-shaped answer, checked as a stream's is (ValidationError if a
    count is not a non-negative integer in range); None if the answer has none."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    return StreamUsage.model_validate(usage).to_usage()
