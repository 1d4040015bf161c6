"""What the compute functions post to the callback routes, and return to Globus Compute.

The contract with `compute_funcs/` (inference.py, streaming.py, batch.py), which ship alone to
the clusters and cannot import this: their module docstrings say the same from their side
(`compute_funcs/batch.py`'s is the whole batch protocol). Unknown fields are ignored, so a newer
function may add some; each field's range is checked.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from first_core.usage import Usage


class CallbackBody(BaseModel):
    """What a compute function posts back (and returns to Globus Compute)."""

    model_config = ConfigDict(extra="ignore")

    request_id: str
    status_code: int
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
    model_config = ConfigDict(extra="ignore")

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    total_tokens: int | None = Field(default=None, ge=0)

    def to_usage(self) -> Usage:
        total = self.total_tokens
        if total is None:
            total = self.prompt_tokens + self.completion_tokens
        return Usage(self.prompt_tokens, self.completion_tokens, total)


class StreamBatchBody(BaseModel):
    """What the streaming compute function posts to the stream callback."""

    model_config = ConfigDict(extra="ignore")

    request_id: str
    seq: int = Field(ge=0)
    chunks: list[str] = Field(default_factory=list)
    done: bool = False
    error: StreamError | None = None
    usage: StreamUsage | None = None


class Counts(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lines: int = Field(default=0, ge=0)
    bytes: int = Field(default=0, ge=0)
    path: str | None = None


class BatchEvent(BaseModel):
    """What the batch function posts (and, for `done`, returns to Globus Compute)."""

    model_config = ConfigDict(extra="ignore")

    batch_id: str
    event: Literal["progress", "upload", "done", "tokens"]
    attempt: int = Field(ge=1)
    # `tokens`: what the next lines may use at most, and what the lines of the last grant used.
    want: int = Field(default=0, ge=0, le=2**31)
    used: int | None = Field(default=None, ge=0, le=2**31)
    completed: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0)
    resumed_lines: int = Field(default=0, ge=0)
    outcome: Literal["completed", "cancelled", "failed"] | None = None
    usage: dict[str, int] = Field(default_factory=dict)
    output: Counts = Counts()
    errors: Counts = Counts()
    error: dict[str, Any] | None = None
