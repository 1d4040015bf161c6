"""OpenAI Files (first_core.batches.files): the line-by-line check of batch inputs, multipart
uploads, and the file records and objects on in-process moto."""

from __future__ import annotations

import json
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from first_core import storage
from first_core.auth import Caller
from first_core.batches import files
from first_core.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError
from first_core.settings import get_settings
from first_core.tables import FileRecord
from tests.support.batches import batch_file, chat_line, jsonl
from tests.support.identities import BOB, CALLER
from tests.support.registry import EMBEDDER, MODEL

# ---- check_batch_lines --------------------------------------------------------------------------


def test_a_valid_file_gives_its_lines_models_and_urls() -> None:
    embedding = {
        "custom_id": "e1",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": EMBEDDER, "input": "hello"},
    }
    content = jsonl(chat_line("a"), "", "   ", chat_line("b"), embedding) + b"\n"
    checked = files.check_batch_lines(content)
    assert checked.lines == 3  # blank lines are not requests
    assert checked.models == sorted([MODEL, EMBEDDER])
    assert checked.urls == ["/v1/chat/completions", "/v1/embeddings"]


def test_batch_lines_take_vllms_parameters_as_requests_do() -> None:
    extras = {"top_k": 20, "min_p": 0.1, "guided_choice": ["yes", "no"], "priority": 1}
    extras["chat_template_kwargs"] = {"enable_thinking": False}
    assert files.check_batch_lines(jsonl(chat_line("a", **extras))).lines == 1
    with pytest.raises(InvalidRequestError) as raised:
        files.check_batch_lines(jsonl(chat_line("a", top_k=-5)))
    assert "body.top_k" in raised.value.message


def test_crlf_line_endings_are_accepted() -> None:
    content = batch_file(3).replace(b"\n", b"\r\n")
    assert files.check_batch_lines(content).lines == 3


def _without(line: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in line.items() if k != key}


BAD_LINES = [
    pytest.param("{not json", "not valid JSON", id="not-json"),
    pytest.param('["a list"]', "the line", id="not-an-object"),
    pytest.param(_without(chat_line("x"), "custom_id"), "custom_id", id="missing-custom-id"),
    pytest.param({**chat_line("x"), "method": "GET"}, "method", id="wrong-method"),
    pytest.param({**chat_line("x"), "url": "/v1/images"}, "url", id="unknown-url"),
    pytest.param({**chat_line("x"), "extra": 1}, "extra", id="unknown-field"),
    pytest.param(
        {**chat_line("x"), "body": {"model": MODEL}}, "body.messages", id="messages-missing"
    ),
    pytest.param(chat_line("x", temperature=5), "body.temperature", id="temperature-too-high"),
    pytest.param(chat_line("x", stream=True), "body.stream", id="stream"),
    pytest.param(chat_line("r0"), "custom_id 'r0' is used twice", id="duplicate-custom-id"),
    # Not blank to the cluster's batch function (bytes.strip()): a line it would count and run.
    pytest.param("\u00a0\u2028", "not valid JSON", id="unicode-space-only"),
]


@pytest.mark.parametrize(("bad", "words"), BAD_LINES)
def test_the_first_bad_line_is_named(bad: Any, words: str) -> None:
    # Line 1 good, line 2 blank (still counted in the numbering), line 3 bad, line 4 good.
    content = jsonl(chat_line("r0"), "", bad, chat_line("r9"))
    with pytest.raises(InvalidRequestError) as raised:
        files.check_batch_lines(content)
    error = raised.value
    assert error.message.startswith("Line 3 of the file: "), error.message
    assert words in error.message
    assert (error.param, error.code, error.status) == ("file", "invalid_batch_line", 400)


def test_only_the_first_of_several_bad_lines_is_named() -> None:
    content = jsonl(chat_line("a"), "{broken", chat_line("b", temperature=-1))
    with pytest.raises(InvalidRequestError, match=r"^Line 2 of the file: not valid JSON"):
        files.check_batch_lines(content)


def test_non_utf8_bytes_are_refused() -> None:
    content = batch_file(1) + b"\n" + b'{"custom_id": "\xff\xfe"}'
    with pytest.raises(InvalidRequestError) as raised:
        files.check_batch_lines(content)
    assert raised.value.code == "invalid_file" and "UTF-8" in raised.value.message


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\r\n"])
def test_an_empty_file_is_refused(content: bytes) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        files.check_batch_lines(content)
    assert raised.value.code == "empty_file"


def test_more_than_max_batch_lines_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "max_batch_lines", 2)
    assert files.check_batch_lines(jsonl(chat_line("a"), "", chat_line("b"))).lines == 2
    content = jsonl(chat_line("a"), "", chat_line("b"), chat_line("c"))
    with pytest.raises(InvalidRequestError) as raised:
        files.check_batch_lines(content)
    assert raised.value.message.startswith("Line 4 of the file: ")
    assert "at most 2 requests" in raised.value.message


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_unicode_line_separators_inside_json_strings_are_not_line_breaks(separator: str) -> None:
    line = chat_line("a")
    line["body"]["messages"][0]["content"] = f"one{separator}two"
    content = (json.dumps(line, ensure_ascii=False) + "\n").encode()
    assert files.check_batch_lines(content).lines == 1


# ---- parse_upload -------------------------------------------------------------------------------


def multipart(
    files_: dict[str, Any] | None = None, data: dict[str, str] | None = None
) -> tuple[str, bytes]:
    request = httpx.Request("POST", "http://gateway/v1/files", files=files_, data=data)
    return request.headers["content-type"], request.read()


def test_parse_upload_reads_the_sdks_form() -> None:
    content = batch_file(2)
    content_type, body = multipart(
        {"file": ("input.jsonl", content, "application/jsonl")}, {"purpose": "batch"}
    )
    upload = files.parse_upload(content_type, body)
    assert (upload.filename, upload.purpose, upload.content) == ("input.jsonl", "batch", content)


def test_parse_upload_without_purpose() -> None:
    content_type, body = multipart({"file": ("in.jsonl", b"x")}, None)
    with pytest.raises(InvalidRequestError) as raised:
        files.parse_upload(content_type, body)
    assert (raised.value.status, raised.value.param) == (400, "purpose")


def test_parse_upload_without_file() -> None:
    # httpx only builds a multipart body when it has files: send another file field.
    content_type, body = multipart({"other": ("in.jsonl", b"x")}, {"purpose": "batch"})
    with pytest.raises(InvalidRequestError) as raised:
        files.parse_upload(content_type, body)
    assert (raised.value.status, raised.value.param) == (400, "file")


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain"])
def test_parse_upload_needs_multipart(content_type: str | None) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        files.parse_upload(content_type, b'{"purpose": "batch"}')
    assert (raised.value.status, raised.value.code) == (400, "invalid_content_type")


@pytest.mark.parametrize(
    "content_type", ["multipart/form-data", "multipart/form-data; boundary=xyz"]
)
def test_parse_upload_malformed_body(content_type: str) -> None:
    body = b"--abc\r\nContent-Disposition: form-data; name=purpose\r\n\r\nbatch\r\n--abc--\r\n"
    with pytest.raises(InvalidRequestError) as raised:
        files.parse_upload(content_type, body)
    assert (raised.value.status, raised.value.code) == (400, "invalid_multipart")


# ---- records and objects ------------------------------------------------------------------------


def upload(caller: Caller = CALLER, content: bytes | None = None, name: str = "in.jsonl") -> str:
    view = files.create(caller, files.Upload(name, "batch", content or batch_file(2)))
    return str(view["id"])


@pytest.mark.usefixtures("aws")
def test_create_keeps_the_object_and_the_checked_record() -> None:
    content = batch_file(3)
    before = time.time()
    view = files.create(CALLER, files.Upload("in.jsonl", "batch", content))
    file_id = view["id"]
    assert file_id.startswith("file-")
    assert view["object"] == "file" and view["bytes"] == len(content)
    assert view["filename"] == "in.jsonl" and view["purpose"] == "batch"
    assert view["status"] == "processed"
    record = FileRecord.get(file_id, consistent_read=True)
    assert record.user_id == CALLER.user_id
    assert record.s3_key == f"files/{file_id}.jsonl"
    assert (int(record.line_count), record.models, record.urls) == (
        3,
        [MODEL],
        ["/v1/chat/completions"],
    )
    assert record.created_at >= before
    assert storage.get(record.s3_key) == content
    assert files.view(files.get_owned(file_id, CALLER)) == view


@pytest.mark.usefixtures("aws")
def test_create_refuses_a_bad_file_and_keeps_nothing() -> None:
    with pytest.raises(InvalidRequestError, match=r"^Line 1 of the file"):
        files.create(CALLER, files.Upload("in.jsonl", "batch", b"{bad"))
    with pytest.raises(InvalidRequestError) as raised:
        files.create(CALLER, files.Upload("in.jsonl", "fine-tune", batch_file(1)))
    assert raised.value.param == "purpose"
    assert list(FileRecord.scan()) == []
    assert storage.s3().list_objects_v2(Bucket=storage.bucket()).get("KeyCount", 0) == 0


@pytest.mark.usefixtures("aws")
def test_create_refuses_a_file_over_the_payload_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    content = batch_file(2)
    monkeypatch.setattr(get_settings(), "max_payload_bytes", len(content) - 1)
    with pytest.raises(PayloadTooLargeError):
        files.create(CALLER, files.Upload("in.jsonl", "batch", content))
    assert list(FileRecord.scan()) == []


@pytest.mark.usefixtures("aws")
def test_files_are_their_owners_only() -> None:
    file_id = upload()
    with pytest.raises(NotFoundError) as other:
        files.get_owned(file_id, BOB)
    with pytest.raises(NotFoundError) as missing:
        files.get_owned("file-doesnotexist", BOB)
    assert other.value.message == f"No such File object: {file_id}"
    assert missing.value.message == "No such File object: file-doesnotexist"
    assert other.value.param == missing.value.param == "file_id"
    # Bob's list does not show it either.
    assert files.list_page(BOB, None, 20, None, "desc")["data"] == []


@pytest.mark.usefixtures("aws")
def test_list_page_orders_pages_and_filters() -> None:
    ids = [upload(name=f"f{i}.jsonl") for i in range(3)]
    files.register_output("file-out", CALLER.user_id, "out.jsonl", "batches/b/output.jsonl", 5, 1)
    upload(BOB)
    everything = files.list_page(CALLER, None, 20, None, "desc")
    assert [f["id"] for f in everything["data"]] == ["file-out", *reversed(ids)]
    assert everything["has_more"] is False
    assert everything["first_id"] == "file-out" and everything["last_id"] == ids[0]

    first = files.list_page(CALLER, "batch", 2, None, "desc")
    assert [f["id"] for f in first["data"]] == [ids[2], ids[1]]
    assert first["has_more"] is True
    rest = files.list_page(CALLER, "batch", 2, first["last_id"], "desc")
    assert [f["id"] for f in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False

    ascending = files.list_page(CALLER, "batch", 2, None, "asc")
    assert [f["id"] for f in ascending["data"]] == ids[:2] and ascending["has_more"] is True
    after = files.list_page(CALLER, None, 5, ids[1], "asc")
    assert [f["id"] for f in after["data"]] == [ids[2], "file-out"]

    outputs = files.list_page(CALLER, "batch_output", 20, None, "desc")
    assert [f["id"] for f in outputs["data"]] == ["file-out"]
    empty = files.list_page(CALLER, "nothing", 20, None, "desc")
    assert empty == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }
    with pytest.raises(NotFoundError):  # another user's id is no cursor
        files.list_page(BOB, None, 20, ids[0], "desc")


@pytest.mark.usefixtures("aws")
def test_delete_removes_the_object_and_the_record() -> None:
    file_id = upload()
    record = files.get_owned(file_id, CALLER)
    assert storage.size(record.s3_key) is not None
    assert files.delete(record) == {"id": file_id, "object": "file", "deleted": True}
    assert storage.size(record.s3_key) is None
    with pytest.raises(FileRecord.DoesNotExist):
        FileRecord.get(file_id, consistent_read=True)
    with pytest.raises(NotFoundError):
        files.get_owned(file_id, CALLER)


@pytest.mark.usefixtures("aws")
def test_small_content_is_answered_inline() -> None:
    content = batch_file(2)
    record = files.get_owned(upload(content=content), CALLER)
    answer = files.content(record)
    assert answer == files.Content(body=content)


@pytest.mark.usefixtures("aws")
def test_large_content_redirects_to_a_presigned_url(monkeypatch: pytest.MonkeyPatch) -> None:
    content = batch_file(2)
    record = files.get_owned(upload(content=content, name="big.jsonl"), CALLER)
    monkeypatch.setattr(get_settings(), "file_inline_bytes", len(content) - 1)
    answer = files.content(record)
    assert answer.body is None and answer.redirect_url
    url = urllib.parse.urlsplit(answer.redirect_url)
    assert url.path.endswith(f"/files/{record.file_id}.jsonl")
    query = urllib.parse.parse_qs(url.query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and "X-Amz-Signature" in query
    assert 'filename="big.jsonl"' in query["response-content-disposition"][0]


@pytest.mark.usefixtures("aws")
def test_register_output_is_idempotent() -> None:
    files.register_output("file-out", "alice-id", "b_output.jsonl", "batches/b/output.jsonl", 7, 2)
    first = FileRecord.get("file-out", consistent_read=True)
    files.register_output("file-out", "bob-id", "other.jsonl", "batches/c/output.jsonl", 9, 3)
    again = FileRecord.get("file-out", consistent_read=True)
    assert again.attribute_values == first.attribute_values
    assert (again.user_id, again.purpose, int(again.bytes), int(again.line_count)) == (
        "alice-id",
        "batch_output",
        7,
        2,
    )


def test_page_params() -> None:
    assert files.page_params({}, 20, 100) == (20, "desc")
    assert files.page_params({"limit": "5", "order": "asc"}, 20, 100) == (5, "asc")
    for params, param in (
        ({"limit": "x"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"order": "up"}, "order"),
    ):
        with pytest.raises(InvalidRequestError) as raised:
            files.page_params(params, 20, 100)
        assert raised.value.param == param


@pytest.mark.usefixtures("aws")
def test_files_expire_with_their_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    before = time.time()
    file_id = upload()
    view = files.view(files.get_owned(file_id, CALLER))
    days = get_settings().file_retention_days
    assert int(before) + days * 86400 <= view["expires_at"] <= time.time() + days * 86400 + 1
    # Past its expiry (DynamoDB deletes the row lazily): gone for its owner too.
    record = FileRecord.get(file_id, consistent_read=True)
    record.update(actions=[FileRecord.expires_at.set(datetime.fromtimestamp(1, tz=UTC))])
    with pytest.raises(NotFoundError):
        files.get_owned(file_id, CALLER)
    listed = files.list_page(CALLER, None, 100, None, "desc")["data"]
    assert file_id not in {f["id"] for f in listed}


@pytest.mark.usefixtures("aws")
def test_content_whose_bytes_the_bucket_expired_is_not_found() -> None:
    file_id = upload()
    record = files.get_owned(file_id, CALLER)
    storage.delete(record.s3_key)
    with pytest.raises(NotFoundError, match="expired"):
        files.content(record)


PYDANTIC_WORDS = ("pydantic", "Input should", "Field required", "Extra inputs", "[key]", "§")


@pytest.mark.parametrize(("bad", "words"), BAD_LINES)
def test_bad_lines_are_named_in_openais_words_as_the_routes_would(bad: Any, words: str) -> None:
    """One wording for one mistake: a batch line's fields are refused as the inference routes
    refuse the same mistake (first_core.schemas.errors), never in pydantic's words."""
    with pytest.raises(InvalidRequestError) as raised:
        files.check_batch_lines(jsonl(chat_line("r0"), bad))
    assert not [w for w in PYDANTIC_WORDS if w in raised.value.message], raised.value.message


def test_a_missing_line_field_reads_like_a_missing_body_field() -> None:
    with pytest.raises(InvalidRequestError) as raised:
        files.check_batch_lines(jsonl(_without(chat_line("x"), "custom_id")))
    assert raised.value.message == "Line 1 of the file: Missing required parameter: 'custom_id'."
