"""OpenAI's Files: batch inputs, checked line by line on upload, and batch outputs
(first_core.batches.files); owner only."""

from __future__ import annotations

from typing import Any

from chalice import Blueprint, Response

from chalicelib.http import caller, current_request, query, raw_body, route
from first_core.batches import files

file_routes = Blueprint(__name__)


@route(file_routes, "/v1/files", methods=["POST"], content_types=["multipart/form-data"])
def upload_file() -> dict[str, Any]:
    """OpenAI's file upload: a batch input, checked line by line before it is kept."""
    who = caller()
    upload = files.parse_upload(current_request().headers.get("content-type"), raw_body())
    return files.create(who, upload)


@route(file_routes, "/v1/files", methods=["GET"])
def list_files() -> dict[str, Any]:
    """The caller's files, optionally of one purpose, as OpenAI's cursor page."""
    who = caller()
    params = query()
    limit, order = files.page_params(params, default_limit=10_000, max_limit=10_000)
    return files.list_page(who, params.get("purpose"), limit, params.get("after"), order)


@route(file_routes, "/v1/files/{file_id}", methods=["GET"])
def get_file(file_id: str) -> dict[str, Any]:
    """One of the caller's files (404 for anyone else's)."""
    return files.view(files.get_owned(file_id, caller()))


@route(file_routes, "/v1/files/{file_id}", methods=["DELETE"])
def delete_file(file_id: str) -> dict[str, Any]:
    """Delete one of the caller's files and its content."""
    return files.delete(files.get_owned(file_id, caller()))


@route(file_routes, "/v1/files/{file_id}/content", methods=["GET"])
def file_content(file_id: str) -> Response:
    """The file's bytes, or a redirect to a presigned URL when too large for a response."""
    content = files.content(files.get_owned(file_id, caller()))
    if content.redirect_url is not None:
        return Response(b"", status_code=302, headers={"Location": content.redirect_url})
    # As text: Chalice answers a binary type only to a request that Accepts it, and the
    # OpenAI SDK does not; batch files are UTF-8 JSONL (checked on upload, written by us).
    return Response(
        (content.body or b"").decode("utf-8", errors="replace"),
        status_code=200,
        headers={"Content-Type": "application/jsonl; charset=utf-8"},
    )
