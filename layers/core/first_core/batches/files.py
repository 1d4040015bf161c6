"""OpenAI Files: batch inputs uploaded by users, batch outputs written by the clusters.

A file's bytes are in the results bucket (`files/{id}.jsonl` for uploads,
`batches/{batch id}/...` for outputs) and its record in the `files` table, owned by one user:
every lookup by id answers the same 404 to anyone else as for an id that does not exist.

An upload with purpose `batch` is checked line by line before it is kept, so a batch never
starts on a file with a bad line: each line is an OpenAI batch request (`custom_id` unique in
the file, `method` POST, `url` one of the inference routes) whose `body` passes the same
validation as a request sent to that route; the error names the first bad line.
"""

from __future__ import annotations

import io
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from first_core import schemas, storage
from first_core.auth import Caller
from first_core.edge import check_unicode
from first_core.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError
from first_core.schemas.errors import to_gateway_error
from first_core.settings import get_settings
from first_core.tables import FileRecord, not_expired, owned_item, put_once

# The routes a batch line may name, and the request schema its body must pass.
BATCH_URLS: dict[str, schemas.Kind] = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
UPLOAD_PURPOSES = ("batch",)
ItemT = TypeVar("ItemT")


class BatchLine(BaseModel):
    """One line of a batch input file, as OpenAI defines it."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    body: dict[str, Any]


@dataclass(frozen=True)
class BatchInput:
    """What the line-by-line check learned, kept on the file record."""

    lines: int
    models: list[str]
    urls: list[str]
    max_tokens: int | None = None  # the most output tokens one line asks for
    max_tokens_line: int | None = None  # and where


def _bad_line(number: int, problem: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Line {number} of the file: {problem}", param="file", code="invalid_batch_line"
    )


def check_batch_lines(content: bytes) -> BatchInput:
    """Every line a valid batch request, or a 400 naming the first line that is not."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequestError(
            f"The file is not UTF-8 text (byte {error.start}).", param="file", code="invalid_file"
        ) from None
    limit = get_settings().max_batch_lines
    seen: set[str] = set()
    models: set[str] = set()
    urls: set[str] = set()
    count = 0
    most_tokens: tuple[int, int] | None = None  # (max_tokens, line number)
    # JSONL lines end at "\n" only: str.splitlines() would also break at U+2028 and the like,
    # which JSON allows unescaped inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        # Blank as the cluster's batch function counts it (ASCII whitespace, as bytes.strip()),
        # so its line counts can be held to this one.
        if not line.strip(" \t\n\r\x0b\x0c"):
            continue
        count += 1
        if count > limit:
            raise _bad_line(number, f"a batch file holds at most {limit} requests.")
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):
            raise _bad_line(number, "not valid JSON.") from None
        try:
            check_unicode(data, line)
        except InvalidRequestError as error:
            raise _bad_line(number, error.message) from None
        if not isinstance(data, dict):
            raise _bad_line(number, "the line must be a JSON object.")
        try:
            request = BatchLine.model_validate(data)
        except ValidationError as error:
            problem = to_gateway_error(error.errors(include_url=False)[0])
            raise _bad_line(number, problem.message) from None
        if request.custom_id in seen:
            raise _bad_line(number, f"custom_id '{request.custom_id}' is used twice.")
        seen.add(request.custom_id)
        try:
            body = schemas.parse_request(BATCH_URLS[request.url], request.body)
        except InvalidRequestError as error:
            where = f"body.{error.param}" if error.param else "body"
            raise _bad_line(number, f"{where}: {error.message}") from None
        if body.wants_stream():
            raise _bad_line(number, "body.stream: batch requests cannot stream.")
        models.add(body.model)
        urls.add(request.url)
        asked = body.max_output_tokens()
        if asked is not None and (most_tokens is None or asked > most_tokens[0]):
            most_tokens = (asked, number)
    if count == 0:
        raise InvalidRequestError("The file holds no requests.", param="file", code="empty_file")
    if most_tokens is None:
        return BatchInput(count, sorted(models), sorted(urls))
    return BatchInput(count, sorted(models), sorted(urls), *most_tokens)


# ---- upload -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """One uploaded file, as the multipart parser read it."""

    filename: str
    purpose: str
    content: bytes


def parse_upload(content_type: str | None, body: bytes) -> Upload:
    """The `multipart/form-data` body the OpenAI SDK sends: a `purpose` field and a `file`."""
    from python_multipart import parse_form

    fields: dict[bytes, bytes] = {}
    files: dict[bytes, Any] = {}
    if not (content_type or "").lower().startswith("multipart/form-data"):
        raise InvalidRequestError(
            "Upload the file as multipart/form-data with fields 'file' and 'purpose'.",
            code="invalid_content_type",
        )
    try:
        parse_form(
            {"Content-Type": (content_type or "").encode()},
            io.BytesIO(body),
            lambda field: fields.__setitem__(field.field_name or b"", field.value or b""),
            lambda file: files.__setitem__(file.field_name or b"", file),
        )
    except Exception:  # python-multipart raises several types for one meaning: malformed
        raise InvalidRequestError("Malformed multipart body.", code="invalid_multipart") from None
    purpose = fields.get(b"purpose", b"").decode(errors="replace")
    if not purpose:
        raise InvalidRequestError("Missing required parameter: 'purpose'.", param="purpose")
    upload = files.get(b"file")
    if upload is None:
        raise InvalidRequestError("Missing required parameter: 'file'.", param="file")
    upload.file_object.seek(0)
    filename = (upload.file_name or b"upload.jsonl").decode(errors="replace")
    return Upload(filename=filename[:255], purpose=purpose, content=upload.file_object.read())


def create(caller: Caller, upload: Upload) -> dict[str, Any]:
    """Check and keep an uploaded batch input; its OpenAI file object."""
    if upload.purpose not in UPLOAD_PURPOSES:
        raise InvalidRequestError(
            f"purpose '{upload.purpose}' is not supported; this gateway takes 'batch' files.",
            param="purpose",
            code="invalid_value",
        )
    limit = get_settings().max_payload_bytes
    if len(upload.content) > limit:
        raise PayloadTooLargeError(
            f"The file is {len(upload.content)} bytes; the limit is {limit}."
        )
    checked = check_batch_lines(upload.content)
    file_id = f"file-{uuid.uuid4().hex}"
    key = f"files/{file_id}.jsonl"
    storage.put(key, upload.content)
    now = time.time()
    record = FileRecord(
        file_id,
        user_id=caller.user_id,
        filename=upload.filename,
        purpose=upload.purpose,
        bytes=len(upload.content),
        s3_key=key,
        created_at=now,
        line_count=checked.lines,
        models=checked.models,
        urls=checked.urls,
        max_tokens=checked.max_tokens,
        max_tokens_line=checked.max_tokens_line,
        expires_at=_expiry(now),
    )
    record.save()
    return view(record)


def register_output(
    file_id: str, user_id: str, filename: str, key: str, size: int, lines: int
) -> None:
    """Record a batch's output (or errors) file, written by the cluster under `key`. The id is
    fixed by the batch, so a repeated finalization finds the record and changes nothing."""
    now = time.time()
    record = FileRecord(
        file_id,
        user_id=user_id,
        filename=filename,
        purpose="batch_output",
        bytes=size,
        s3_key=key,
        created_at=now,
        line_count=lines,
        expires_at=_expiry(now),
    )
    put_once(record, FileRecord.file_id.does_not_exist())


def _expiry(now: float) -> datetime:
    return datetime.fromtimestamp(now + get_settings().file_retention_days * 86400, tz=UTC)


# ---- reading, listing, deleting ---------------------------------------------------------------


def get_owned(file_id: str, caller: Caller) -> FileRecord:
    """The file if the caller owns it; anyone else gets the same 404 as for a missing one."""
    record = owned_item(FileRecord, file_id, caller.user_id)
    # An expired file is gone, whether or not DynamoDB has deleted its row yet.
    if record is None or not not_expired(record.expires_at):
        raise NotFoundError(f"No such File object: {file_id}", param="file_id")
    return record


def view(record: FileRecord) -> dict[str, Any]:
    """A file record as OpenAI's file object."""
    return {
        "id": record.file_id,
        "object": "file",
        "bytes": int(record.bytes),
        "created_at": int(record.created_at),
        "expires_at": int(record.expires_at.timestamp()) if record.expires_at else None,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
    }


@dataclass(frozen=True)
class Content:
    """A file's bytes, or where to fetch them when they are too large to answer inline."""

    body: bytes | None = None
    redirect_url: str | None = None


def content(record: FileRecord) -> Content:
    """A file's content: its bytes, or a presigned url when it is larger than answers carry inline
    (404 once the bucket has expired it)."""
    if int(record.bytes) > get_settings().file_inline_bytes:
        return Content(redirect_url=storage.presigned_url("GET", record.s3_key, record.filename))
    body = storage.get_if_present(record.s3_key)
    if body is None:  # the bucket's lifecycle rule removed it first
        raise NotFoundError(f"The content of {record.file_id} has expired.", param="file_id")
    return Content(body=body)


def delete(record: FileRecord) -> dict[str, Any]:
    """Delete the file's object and record; OpenAI's deletion answer."""
    storage.delete(record.s3_key)
    record.delete()
    return {"id": record.file_id, "object": "file", "deleted": True}


def list_page(
    caller: Caller, purpose: str | None, limit: int, after: str | None, order: str
) -> dict[str, Any]:
    """The caller's files, newest first (or `order=asc`), as OpenAI's cursor page."""
    condition = None
    if after:
        cursor = get_owned(after, caller)
        condition = (
            FileRecord.created_at > cursor.created_at
            if order == "asc"
            else FileRecord.created_at < cursor.created_at
        )
    found = FileRecord.by_user.query(
        caller.user_id,
        condition,
        filter_condition=(FileRecord.purpose == purpose) if purpose else None,
        scan_index_forward=order == "asc",
    )
    live = (record for record in found if not_expired(record.expires_at))
    return cursor_page(live, limit, view)


def cursor_page(
    items: Iterable[ItemT], limit: int, view: Callable[[ItemT], dict[str, Any]]
) -> dict[str, Any]:
    """The first `limit` items in OpenAI's list shape, which the SDK pages through with
    `after=last_id`; one more is read only to know whether there is more."""
    page = list(itertools.islice(items, limit + 1))
    data = [view(item) for item in page[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(page) > limit,
    }


def page_params(params: dict[str, str], default_limit: int, max_limit: int) -> tuple[int, str]:
    """`limit` and `order` of a list request, checked."""
    try:
        limit = int(params.get("limit", default_limit))
    except ValueError:
        raise InvalidRequestError("limit must be an integer.", param="limit") from None
    if not 1 <= limit <= max_limit:
        raise InvalidRequestError(f"limit must be between 1 and {max_limit}.", param="limit")
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("order must be 'asc' or 'desc'.", param="order")
    return limit, order
