"""What every callback route checks first: the callback token, the size, the body's shape.

A callback token is the HMAC-SHA256 of the object's id (a request or a batch) under the server's
callback secret: it proves the caller was handed that one object, it is checked in constant time
before anything else is looked at, and it is never stored.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal, TypeVar

from pydantic import BaseModel, ValidationError

from first_core.errors import AuthenticationError, InvalidRequestError, PayloadTooLargeError
from first_core.settings import get_settings


class MissingCallbackSecret(RuntimeError):
    """An HMAC under an empty key is no secret: refuse to sign or verify without one."""


def callback_url(object_id: str, sink: Literal["result", "stream", "batch"]) -> str:
    """Where a compute function posts back for this request or batch (chalicelib/callbacks.py):
    the gateway's public base URL, since the cluster reaches it from outside."""
    url = f"{get_settings().public_base_url.rstrip('/')}/callbacks/{object_id}"
    return url if sink == "result" else f"{url}/{sink}"


def callback_token(request_id: str) -> str:
    """The request's callback token: the HMAC-SHA256 of its id under the callback secret, in hex;
    only the cluster task sent for that request carries it."""
    secret = get_settings().callback_secret.get_secret_value().encode()
    if not secret:
        raise MissingCallbackSecret("FIRST_CALLBACK_SECRET is not set")
    return hmac.new(secret, request_id.encode(), hashlib.sha256).hexdigest()


def verify_callback_token(request_id: str, authorization: str | None) -> None:
    """Raise 401 unless the Authorization header is `Bearer` and this request's exact token,
    compared in constant time."""
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        presented = ""
    if not hmac.compare_digest(presented.encode(), callback_token(request_id).encode()):
        raise AuthenticationError(
            "Invalid callback token for this request.", code="invalid_callback"
        )


CallbackT = TypeVar("CallbackT", bound=BaseModel)


def read_callback(
    object_id: str,
    authorization: str | None,
    raw_body: bytes,
    body_type: type[CallbackT],
    max_bytes: int,
    id_field: str = "request_id",
) -> CallbackT:
    """Every callback route's first steps, in this order: the token for this object (constant
    time, before anything else is looked at), the size, the body's shape, and that the body
    names the object of the URL in its `id_field`."""
    verify_callback_token(object_id, authorization)
    if len(raw_body) > max_bytes:
        raise PayloadTooLargeError("Callback body too large.")
    try:
        body = body_type.model_validate_json(raw_body)
    except ValidationError:
        raise InvalidRequestError(
            "Malformed callback body.", code="invalid_callback_body"
        ) from None
    if getattr(body, id_field) != object_id:
        raise InvalidRequestError("Callback body names another object.", param=id_field)
    return body
