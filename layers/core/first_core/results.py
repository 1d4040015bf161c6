"""Results coming back from the clusters: callback tokens, the results table, and S3 spill-over.

A callback token is the HMAC-SHA256 of the request id under the server's callback secret: it
proves the caller was handed that one request, it is checked in constant time, and it is never
stored. The result row is written with a conditional put, so a repeated callback is a no-op;
bodies too large for a DynamoDB item go to the results bucket with a pointer in the row.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from pynamodb.exceptions import DoesNotExist, TransactWriteError
from pynamodb.transactions import TransactWrite

from first_core import records
from first_core.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    PayloadTooLargeError,
)
from first_core.settings import get_settings
from first_core.tables import RequestRecord, ResultRecord, connection
from first_core.usage import Usage


class MissingCallbackSecret(RuntimeError):
    """An HMAC under an empty key is no secret: refuse to sign or verify without one."""


def callback_token(request_id: str) -> str:
    secret = get_settings().callback_secret.get_secret_value().encode()
    if not secret:
        raise MissingCallbackSecret("FIRST_CALLBACK_SECRET is not set")
    return hmac.new(secret, request_id.encode(), hashlib.sha256).hexdigest()


def verify_callback_token(request_id: str, authorization: str | None) -> None:
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        presented = ""
    if not hmac.compare_digest(presented.encode(), callback_token(request_id).encode()):
        raise AuthenticationError(
            "Invalid callback token for this request.", code="invalid_callback"
        )


class CallbackBody(BaseModel):
    """What a compute function posts back (and returns to Globus Compute)."""

    model_config = ConfigDict(extra="ignore")

    request_id: str
    status_code: int
    body: Any = None


@dataclass(frozen=True)
class Result:
    status_code: int
    body: Any


@lru_cache(maxsize=1)
def _s3() -> Any:
    import boto3

    s = get_settings()
    return boto3.client("s3", region_name=s.aws_region, endpoint_url=s.aws_endpoint_url)


def record(
    request_id: str, status_code: int, body: Any
) -> Literal["written", "duplicate", "refused"]:
    """Write the result and end the request record, in one transaction.

    `duplicate`: the result was already there (a repeated callback); `refused`: the request does
    not exist or already ended otherwise (cancelled, failed). Either way nothing changes.
    """
    s = get_settings()
    text = json.dumps(body, separators=(",", ":"))
    now = time.time()
    row = ResultRecord(
        request_id,
        status_code=status_code,
        created_at=now,
        expires_at=datetime.fromtimestamp(now + s.result_ttl_seconds, tz=UTC),
    )
    if len(text) <= s.inline_result_bytes:
        row.body = text
    else:
        # A key of its own per attempt: a repeat must not overwrite the result that won.
        row.s3_key = f"results/{request_id}/{uuid.uuid4().hex}.json"
        _s3().put_object(Bucket=s.results_bucket, Key=row.s3_key, Body=text.encode())
    if status_code < 400:
        end = records.finish_actions("completed", usage=Usage.from_body(body))
    else:
        end = records.finish_actions("failed", error=error_message(body))
    try:
        with TransactWrite(connection=connection()) as transaction:
            transaction.save(row, condition=ResultRecord.request_id.does_not_exist())
            transaction.update(RequestRecord(request_id), actions=end, condition=records.STILL_OPEN)
    except TransactWriteError as failure:
        if row.s3_key:
            _s3().delete_object(Bucket=s.results_bucket, Key=row.s3_key)
        reasons = [r.code if r else None for r in failure.cancellation_reasons]
        if reasons[:1] == ["ConditionalCheckFailed"]:
            return "duplicate"
        if reasons[1:2] == ["ConditionalCheckFailed"]:
            return "refused"
        raise
    return "written"


def load(request_id: str) -> Result | None:
    try:
        row = ResultRecord.get(request_id, consistent_read=True)
    except DoesNotExist:
        return None
    if row.s3_key:
        text = _s3().get_object(Bucket=get_settings().results_bucket, Key=row.s3_key)["Body"].read()
    else:
        text = row.body or "null"
    return Result(int(row.status_code), json.loads(text))


def accept_callback(request_id: str, authorization: str | None, raw_body: bytes) -> dict[str, Any]:
    """The callback route: verify the token, then record the result once."""
    verify_callback_token(request_id, authorization)
    if len(raw_body) > get_settings().max_payload_bytes:
        raise PayloadTooLargeError("Callback body too large.")
    try:
        callback = CallbackBody.model_validate_json(raw_body)
    except ValidationError:
        raise InvalidRequestError(
            "Malformed callback body.", code="invalid_callback_body"
        ) from None
    if callback.request_id != request_id:
        raise InvalidRequestError("Callback body names another request.", param="request_id")
    outcome = record(request_id, callback.status_code, callback.body)
    if outcome == "refused":
        raise ConflictError(f"Request {request_id} does not exist or has already ended.")
    return {"accepted": outcome == "written", "duplicate": outcome == "duplicate"}


def error_message(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(body.get("message", error))
    return str(body)
