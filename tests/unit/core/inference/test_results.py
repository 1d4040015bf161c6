"""The result sink (first_core.inference.results): recording a result exactly once, S3
spill-over, and accepting a callback."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest

import first_core.callbacks
import first_core.inference.results
import first_core.storage
from first_core.callbacks import TEMPLATE_TOKENS, callback_token
from first_core.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    PayloadTooLargeError,
)
from first_core.inference import records
from first_core.inference.results import (
    Result,
    accept_callback,
    error_message,
    load,
    record,
    request_view,
)
from first_core.settings import get_settings
from first_core.tables import RequestRecord, ResultRecord
from tests.support.identities import CALLER
from tests.support.registry import ENDPOINT

REQUEST_ID = "req_00000000000000000000000000000001"
OTHER_ID = "req_00000000000000000000000000000002"


def completion(
    text: str = "Hello!", prompt: int = 12, completion_tokens: int = 3
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": ENDPOINT.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        },
    }


def open_request(request_id: str = REQUEST_ID) -> str:
    records.create(request_id, CALLER, ENDPOINT, "chat/completions", False, "sophia: test")
    return request_id


def raw_item(table: type, request_id: str) -> dict[str, Any] | None:
    """The item exactly as stored (not through pynamodb), for before/after comparisons."""
    client = boto3.client("dynamodb", region_name=get_settings().aws_region)
    answer = client.get_item(
        TableName=table.Meta.table_name, Key={"request_id": {"S": request_id}}, ConsistentRead=True
    )
    return answer.get("Item")


def s3_keys() -> list[str]:
    answer = first_core.storage.s3().list_objects_v2(Bucket=get_settings().results_bucket)
    return [obj["Key"] for obj in answer.get("Contents", [])]


def callback_body(request_id: str, status_code: int = 200, body: Any = None) -> bytes:
    payload = {"request_id": request_id, "status_code": status_code, "body": body}
    return json.dumps(payload).encode()


# -- record() ---------------------------------------------------------------------------------
def test_record_on_an_open_request_ends_it_with_the_answer_on_its_record(aws: None) -> None:
    open_request()
    body = completion(prompt=12, completion_tokens=3)

    assert record(REQUEST_ID, 200, body) == "written"

    request = RequestRecord.get(REQUEST_ID, consistent_read=True)
    assert request.status == "completed"
    assert request.open_status is None  # left the reconciler's open index
    assert request.completed_at is not None
    assert (request.prompt_tokens, request.completion_tokens, request.total_tokens) == (12, 3, 15)
    assert request.error is None
    # The answer is on the record, written by the update that ended it: no result row.
    assert request.response_status == 200
    assert json.loads(request.response_body) == body
    assert request.response_s3_key is None
    assert load(REQUEST_ID) == Result(200, body)


def test_record_ends_the_request_in_one_write_and_writes_no_result_row(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19's budget: the answer rides on the update that ends the record (then the usage
    record's put and the reservation's settle): no result row, no other write to the record."""
    open_request()
    updates: list[list[Any]] = []
    real_update = RequestRecord.update

    def counted(self: RequestRecord, *args: Any, **kwargs: Any) -> Any:
        updates.append(list(kwargs.get("actions") or []))
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(RequestRecord, "update", counted)

    assert record(REQUEST_ID, 200, completion()) == "written"

    assert len(updates) == 1
    assert list(ResultRecord.scan()) == []
    assert load(REQUEST_ID) == Result(200, completion())


def test_the_request_view_shows_the_answer_from_the_record(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_request()
    open_request(OTHER_ID)
    monkeypatch.setattr(get_settings(), "inline_result_bytes", 1_000)
    big = big_completion(5_000)
    record(REQUEST_ID, 200, completion("inline"))
    record(OTHER_ID, 200, big)

    assert request_view(RequestRecord.get(REQUEST_ID))["response"] == completion("inline")
    assert request_view(RequestRecord.get(OTHER_ID))["response"] == big
    # The bucket's results/ expire before the record does: an old large answer is gone.
    for key in s3_keys():
        first_core.storage.delete(key)
    assert request_view(RequestRecord.get(OTHER_ID))["response"] is None


def test_total_tokens_is_derived_when_the_body_omits_it(aws: None) -> None:
    open_request()
    body = {"usage": {"prompt_tokens": 5, "completion_tokens": 7}}

    record(REQUEST_ID, 200, body)

    assert RequestRecord.get(REQUEST_ID, consistent_read=True).total_tokens == 12


def test_second_record_is_a_duplicate_and_changes_nothing(aws: None) -> None:
    open_request()
    assert record(REQUEST_ID, 200, completion("first")) == "written"
    request_before = raw_item(RequestRecord, REQUEST_ID)

    outcome = record(REQUEST_ID, 500, {"error": {"message": "late failure"}})

    assert outcome == "duplicate"
    assert raw_item(RequestRecord, REQUEST_ID) == request_before
    assert load(REQUEST_ID) == Result(200, completion("first"))


def test_record_on_a_cancelled_request_is_refused_and_writes_no_result(aws: None) -> None:
    """The client left (the request was cancelled): its answer is stored nowhere, but what ran
    is billed once, as a cancelled stream's final usage is; the status stays `cancelled`."""
    open_request()
    assert records.finish(REQUEST_ID, "cancelled")
    request_before = raw_item(RequestRecord, REQUEST_ID)
    assert request_before is not None

    assert record(REQUEST_ID, 200, completion()) == "refused"
    assert record(REQUEST_ID, 200, completion(prompt=99)) == "refused"  # billed once

    assert load(REQUEST_ID) is None
    billed = {"prompt_tokens": "12", "completion_tokens": "3", "total_tokens": "15"}
    assert raw_item(RequestRecord, REQUEST_ID) == {
        **request_before,
        **{name: {"N": count} for name, count in billed.items()},
    }
    assert RequestRecord.get(REQUEST_ID).status == "cancelled"


def test_record_for_an_unknown_request_is_refused(aws: None) -> None:
    assert record(OTHER_ID, 200, completion()) == "refused"

    assert raw_item(RequestRecord, OTHER_ID) is None  # the update did not create a stub


def test_error_status_fails_the_request_with_the_error_message(aws: None) -> None:
    open_request()
    body = {"error": {"message": "CUDA out of memory", "type": "server_error"}}

    assert record(REQUEST_ID, 502, body) == "written"

    request = RequestRecord.get(REQUEST_ID, consistent_read=True)
    assert request.status == "failed"
    assert request.error == "CUDA out of memory"
    assert request.open_status is None
    assert request.total_tokens is None
    assert load(REQUEST_ID) == Result(502, body)


@pytest.mark.parametrize(
    ("status_code", "status"), [(399, "completed"), (400, "failed"), (422, "failed")]
)
def test_status_code_400_and_above_is_a_failure(aws: None, status_code: int, status: str) -> None:
    open_request()

    record(REQUEST_ID, status_code, {"message": "m"})

    assert RequestRecord.get(REQUEST_ID, consistent_read=True).status == status


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"error": {"message": "boom"}}, "boom"),
        ({"error": "plain"}, "plain"),
        ({"message": "top-level"}, "top-level"),
        ("just text", "just text"),
    ],
)
def test_error_message_finds_the_message(body: Any, message: str) -> None:
    assert error_message(body) == message


# -- S3 spill-over ----------------------------------------------------------------------------
def big_completion(size: int) -> dict[str, Any]:
    return completion(text="x" * size)


def test_large_body_goes_to_s3_and_loads_back_whole(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "inline_result_bytes", 1_000)
    open_request()
    body = big_completion(5_000)

    assert record(REQUEST_ID, 200, body) == "written"

    request = RequestRecord.get(REQUEST_ID, consistent_read=True)
    assert request.response_body is None
    key = request.response_s3_key
    assert key and key.startswith(f"results/{REQUEST_ID}/")
    assert "response_body" not in (raw_item(RequestRecord, REQUEST_ID) or {})
    assert s3_keys() == [key]
    assert load(REQUEST_ID) == Result(200, body)
    assert RequestRecord.get(REQUEST_ID).total_tokens == 15


def test_body_at_the_inline_limit_stays_inline(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    body = big_completion(10)
    size = len(json.dumps(body, separators=(",", ":")))
    monkeypatch.setattr(get_settings(), "inline_result_bytes", size)
    open_request()

    record(REQUEST_ID, 200, body)

    assert RequestRecord.get(REQUEST_ID).response_s3_key is None
    assert s3_keys() == []


def test_duplicate_large_body_does_not_replace_the_stored_result(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "inline_result_bytes", 1_000)
    open_request()
    first = big_completion(5_000)
    assert record(REQUEST_ID, 200, first) == "written"

    assert record(REQUEST_ID, 200, completion(text="y" * 5_000)) == "duplicate"

    assert load(REQUEST_ID) == Result(200, first)
    assert len(s3_keys()) == 1  # the repeat's copy was taken back


def test_refused_large_body_leaves_nothing_in_s3(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "inline_result_bytes", 1_000)
    open_request()
    records.finish(REQUEST_ID, "cancelled")

    assert record(REQUEST_ID, 200, big_completion(5_000)) == "refused"

    assert s3_keys() == []


# -- the callback route -----------------------------------------------------------------------
def authorization(request_id: str = REQUEST_ID) -> str:
    return f"Bearer {callback_token(request_id)}"


def test_accept_callback_records_once(aws: None) -> None:
    open_request()
    raw = callback_body(REQUEST_ID, 200, completion())

    assert accept_callback(REQUEST_ID, authorization(), raw) == {
        "accepted": True,
        "duplicate": False,
    }
    assert accept_callback(REQUEST_ID, authorization(), raw) == {
        "accepted": False,
        "duplicate": True,
    }
    assert load(REQUEST_ID) == Result(200, completion())


def test_accept_callback_with_a_wrong_token_is_401_and_records_nothing(aws: None) -> None:
    open_request()

    with pytest.raises(AuthenticationError):
        accept_callback(REQUEST_ID, authorization(OTHER_ID), callback_body(REQUEST_ID))

    assert load(REQUEST_ID) is None
    assert RequestRecord.get(REQUEST_ID).status == "submitted"


def test_accept_callback_body_naming_another_request_is_400(aws: None) -> None:
    open_request()
    open_request(OTHER_ID)

    with pytest.raises(InvalidRequestError) as invalid:
        accept_callback(REQUEST_ID, authorization(), callback_body(OTHER_ID, 200, completion()))

    assert invalid.value.status == 400
    assert invalid.value.param == "request_id"
    assert load(REQUEST_ID) is None
    assert load(OTHER_ID) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"[]",
        b'{"request_id": "req_x"}',
        b'{"status_code": 200}',
        b'{"request_id": "' + REQUEST_ID.encode() + b'", "status_code": "two hundred"}',
    ],
    ids=["broken", "empty", "list", "no-status", "no-id", "status-not-int"],
)
def test_accept_callback_with_a_malformed_body_is_400(aws: None, raw: bytes) -> None:
    open_request()

    with pytest.raises(InvalidRequestError) as invalid:
        accept_callback(REQUEST_ID, authorization(), raw)

    assert invalid.value.status == 400
    assert invalid.value.code == "invalid_callback_body"
    assert load(REQUEST_ID) is None


def test_accept_callback_with_an_oversize_body_is_413_and_fails_the_request(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "max_payload_bytes", 200)
    open_request()
    raw = callback_body(REQUEST_ID, 200, completion(text="z" * 500))

    with pytest.raises(PayloadTooLargeError) as too_large:
        accept_callback(REQUEST_ID, authorization(), raw)

    assert too_large.value.status == 413
    # The answer is not kept; the client waiting on it gets a clear error instead.
    stored = load(REQUEST_ID)
    assert stored is not None and stored.status_code == 502
    assert stored.body["error"]["code"] == "result_too_large"
    assert "zzz" not in json.dumps(stored.body)
    request = RequestRecord.get(REQUEST_ID)
    assert request.status == "failed"
    assert "limit of 200 bytes" in (request.error or "")


def test_accept_callback_with_an_oversize_body_and_a_wrong_token_changes_nothing(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "max_payload_bytes", 200)
    open_request()
    raw = callback_body(REQUEST_ID, 200, completion(text="z" * 500))

    with pytest.raises(AuthenticationError):
        accept_callback(REQUEST_ID, f"Bearer {callback_token(OTHER_ID)}", raw)

    assert load(REQUEST_ID) is None
    assert RequestRecord.get(REQUEST_ID).status == "submitted"


def test_accept_callback_for_a_cancelled_request_is_409(aws: None) -> None:
    open_request()
    records.finish(REQUEST_ID, "cancelled")

    with pytest.raises(ConflictError) as conflict:
        accept_callback(REQUEST_ID, authorization(), callback_body(REQUEST_ID, 200, completion()))

    assert conflict.value.status == 409
    assert load(REQUEST_ID) is None


# -- bounds: a callback is trusted only within what the backend could have produced ------------
def bounded_request(request_id: str = REQUEST_ID, max_tokens: int | None = 5) -> str:
    """A request sent with max_tokens 5 and n 2 (at most 10 completion tokens) and a 100-byte
    prompt (at most 100 prompt tokens)."""
    records.create(
        request_id,
        CALLER,
        ENDPOINT,
        "chat/completions",
        False,
        "sophia: test",
        max_tokens=max_tokens,
        choices=2,
        prompt_bytes=100,
    )
    return request_id


def raw_callback(request_id: str, status_code: Any, body: Any) -> bytes:
    return json.dumps({"request_id": request_id, "status_code": status_code, "body": body}).encode()


def test_the_record_keeps_what_was_sent(aws: None) -> None:
    bounded_request()
    stored = RequestRecord.get(REQUEST_ID)
    assert (stored.max_tokens, stored.choices, stored.prompt_bytes) == (5, 2, 100)


@pytest.mark.parametrize("status_code", [99, 600, "200", 1.5, True, None, -200, 10**40])
def test_a_status_code_out_of_range_is_400_and_the_real_answer_still_lands(
    aws: None, status_code: Any
) -> None:
    bounded_request()
    with pytest.raises(InvalidRequestError) as invalid:
        accept_callback(REQUEST_ID, authorization(), raw_callback(REQUEST_ID, status_code, {}))
    assert invalid.value.status == 400
    assert load(REQUEST_ID) is None
    assert RequestRecord.get(REQUEST_ID).status == "submitted"

    answer = completion(prompt=12, completion_tokens=3)
    assert accept_callback(REQUEST_ID, authorization(), raw_callback(REQUEST_ID, 200, answer))
    assert load(REQUEST_ID) == Result(200, answer)


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -1000, "completion_tokens": 3, "total_tokens": -997},
        {"prompt_tokens": 12, "completion_tokens": -5, "total_tokens": 7},
        {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": -1},
        {"prompt_tokens": 12, "completion_tokens": 11, "total_tokens": 23},  # > 5 x 2
        # More than 100 bytes (and the chat template's few) could make.
        {"prompt_tokens": 100 + TEMPLATE_TOKENS + 1, "completion_tokens": 3},
        {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 10**6},
        {"prompt_tokens": 10**40, "completion_tokens": 3},
        {"prompt_tokens": "12", "completion_tokens": 3},
        {"prompt_tokens": 1.5, "completion_tokens": 3},
        {"prompt_tokens": True, "completion_tokens": 3},
    ],
    ids=[
        "negative-prompt",
        "negative-completion",
        "negative-total",
        "completion-over-max-tokens-times-n",
        "prompt-over-its-bytes",
        "total-over-both",
        "giant",
        "string",
        "fraction",
        "boolean",
    ],
)
def test_usage_out_of_range_is_400_and_changes_nothing(
    aws: None, usage: dict[str, Any]
) -> None:
    bounded_request()
    before = raw_item(RequestRecord, REQUEST_ID)
    body = {**completion(), "usage": usage}
    with pytest.raises(InvalidRequestError) as invalid:
        accept_callback(REQUEST_ID, authorization(), raw_callback(REQUEST_ID, 200, body))
    assert invalid.value.status == 400
    assert invalid.value.param == "usage"
    assert load(REQUEST_ID) is None
    assert raw_item(RequestRecord, REQUEST_ID) == before


def test_usage_at_the_bounds_is_accepted(aws: None) -> None:
    bounded_request()
    most = 100 + TEMPLATE_TOKENS
    body = completion(prompt=most, completion_tokens=10)
    assert accept_callback(REQUEST_ID, authorization(), raw_callback(REQUEST_ID, 200, body))
    stored = RequestRecord.get(REQUEST_ID)
    assert (stored.status, stored.prompt_tokens) == ("completed", most)
    assert stored.completion_tokens == 10


def test_without_max_tokens_the_completion_bound_is_not_checked(aws: None) -> None:
    bounded_request(max_tokens=None)
    body = completion(prompt=10, completion_tokens=5000)
    assert accept_callback(REQUEST_ID, authorization(), raw_callback(REQUEST_ID, 200, body))
    assert RequestRecord.get(REQUEST_ID).completion_tokens == 5000


def test_a_failure_is_not_held_to_the_usage_bounds(aws: None) -> None:
    bounded_request()
    body = {"error": {"message": "boom"}, "usage": {"prompt_tokens": -5}}
    assert accept_callback(REQUEST_ID, authorization(), raw_callback(REQUEST_ID, 500, body))
    stored = RequestRecord.get(REQUEST_ID)
    assert stored.status == "failed" and stored.total_tokens is None


def test_record_refuses_an_answer_over_the_cap_on_any_path(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "max_payload_bytes", 200)
    open_request()

    assert record(REQUEST_ID, 200, completion(text="z" * 500)) == "written"

    stored = load(REQUEST_ID)
    assert stored is not None and stored.status_code == 502
    assert stored.body["error"]["code"] == "result_too_large"
    assert s3_keys() == []
    request = RequestRecord.get(REQUEST_ID)
    assert request.status == "failed" and request.total_tokens is None
