"""Validation of the request bodies the gateway accepts, before anything is sent to a cluster.

The rules are those of the reference FIRST gateway (its fixtures are the conformance suite),
which follow OpenAI's API: unknown keys are refused at every level, types are strict (no
"1.2" for a number, no 1 for a boolean), and ranges are OpenAI's. A refusal names the offending
field the way OpenAI does (`messages.0.content`), never with pydantic's own wording.

Every union is discriminated by a function that looks at the raw JSON value, so a wrong value
yields one error on the branch the client meant instead of one per branch. Those branches carry
tags starting with `_TAG`, which are dropped again when an error location becomes a `param`.

- `requests`: the bodies and `parse_request`; `messages`: chat messages and their parts;
- `apis`: the bodies of the Responses and Messages APIs;
- `errors`: pydantic's errors in OpenAI's words;
- `wire`: what the compute functions post to the callbacks and return (the contract with
  `compute_funcs`, which ships alone and cannot import it).
"""

from first_core.schemas import requests as _requests
from first_core.schemas.apis import MessagesRequest, ResponsesRequest
from first_core.schemas.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    FirstBatchRequest,
    Kind,
    RequestBody,
    StreamOptions,
    parse_request,
)

# The Responses and Messages bodies build on `requests`, so they join its table here.
_requests._MODELS.update(responses=ResponsesRequest, messages=MessagesRequest)

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "FirstBatchRequest",
    "Kind",
    "MessagesRequest",
    "RequestBody",
    "ResponsesRequest",
    "StreamOptions",
    "parse_request",
]
