"""The callback sink: what the clusters' compute functions post back, with a per-object
callback token instead of a user's token (first_core.callbacks checks it first)."""

from __future__ import annotations

from typing import Any

from chalice import Blueprint

from chalicelib.http import authorization, raw_body, route
from first_core.batches import callbacks as batch_callbacks
from first_core.inference import results, stream_sink

callbacks = Blueprint(__name__)
JSON = ["application/json"]


@route(callbacks, "/callbacks/{request_id}", methods=["POST"], content_types=JSON)
def result_callback(request_id: str) -> dict[str, Any]:
    """A cluster's result for one request, recorded once."""
    return results.accept_callback(request_id, authorization(), raw_body())


@route(callbacks, "/callbacks/{request_id}/stream", methods=["POST"], content_types=JSON)
def stream_callback(request_id: str) -> dict[str, Any]:
    """A numbered batch of a stream's chunks; the answer says whether the client is still there."""
    return stream_sink.accept_stream_callback(request_id, authorization(), raw_body())


# The variable is named as in the request callbacks' paths: API Gateway allows one variable
# name per level under /callbacks. Here it holds a batch id.
@route(callbacks, "/callbacks/{request_id}/batch", methods=["POST"], content_types=JSON)
def batch_callback(request_id: str) -> dict[str, Any]:
    """A batch function's progress, upload or done report."""
    return batch_callbacks.accept_callback(request_id, authorization(), raw_body())
