"""`Idempotency-Key` on the inference routes: a repeat of a request, with the same key from the
same user within 24 hours, gets the request the first one started (its stored answer, or a wait
on it, with the same `x-first-request-id`), never a second job on a cluster.

The key is bound to a request id with one conditional put before anything is reserved or
written for the request, so two repeats racing each other start one job between them. Only a
hash of the key is stored, under the user's id: one user's keys never meet another's. The same
key with another body is refused (400), as a client bug rather than a repeat.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from first_core.errors import InvalidRequestError, NotFoundError
from first_core.tables import IdempotencyKey, put_once

HEADER = "Idempotency-Key"
KEY_TTL_SECONDS = 24 * 3600
_MAX_KEY_LENGTH = 255


def check_key(key: str | None) -> str | None:
    """The header's value if it is a usable key (1 to 255 printable ASCII characters), None if
    absent; 400 otherwise."""
    if key is None:
        return None
    if not 0 < len(key) <= _MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise InvalidRequestError(
            f"{HEADER} must be 1 to {_MAX_KEY_LENGTH} printable ASCII characters.",
            param=HEADER,
            code="invalid_idempotency_key",
        )
    return key


def claim(
    user_id: str, key: str, raw_body: bytes, request_id: str, replacing: str | None = None
) -> str:
    """Bind the user's key to `request_id` (or move it there from `replacing`, an attempt a
    federated retry left failed); the request id the key is bound to now: `request_id` if this
    claim won, else the first request's. 400 if the key came with another body before."""
    now = time.time()
    body_hash = hashlib.sha256(raw_body).hexdigest()
    row = IdempotencyKey(
        _row_key(user_id, key),
        request_id=request_id,
        body_hash=body_hash,
        expires_at=datetime.fromtimestamp(now + KEY_TTL_SECONDS, tz=UTC),
    )
    if replacing is not None:
        condition = IdempotencyKey.request_id == replacing
    else:
        # DynamoDB deletes expired rows lazily: one past its 24 h is free again.
        expired = IdempotencyKey.expires_at < datetime.fromtimestamp(now, tz=UTC)
        condition = IdempotencyKey.key.does_not_exist() | expired
    if put_once(row, condition):
        return request_id
    bound = IdempotencyKey.get(row.key, consistent_read=True)
    if bound.body_hash != body_hash:
        raise InvalidRequestError(
            f"This {HEADER} was used with another request body in the last 24 hours; use a new "
            "key for a new request.",
            param=HEADER,
            code="idempotency_key_reused",
        )
    return str(bound.request_id)


T = TypeVar("T")


def first_made(load: Callable[[], T], seconds: float = 5.0) -> T:
    """What the first call with a key made, by `load`: its record may be a moment behind the
    key (written just after the claim), so a NotFoundError is tried again for `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return load()
        except NotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def release(user_id: str, key: str, request_id: str) -> None:
    """Unbind the key from a request that was refused before it was recorded (a rate limit): a
    repeat then starts afresh. Best effort: at worst the repeat finds no such request."""
    with contextlib.suppress(Exception):  # the key expires anyway
        IdempotencyKey(_row_key(user_id, key)).delete(
            condition=IdempotencyKey.request_id == request_id
        )


def _row_key(user_id: str, key: str) -> str:
    return f"{user_id}#{hashlib.sha256(key.encode()).hexdigest()}"
