"""What the Messages route adds to auth and errors: `x-api-key`, and Anthropic's error shape."""

from __future__ import annotations

import pytest

from first_core.credentials import authorization_or_api_key
from first_core.errors import InvalidRequestError, NotFoundError, anthropic_body


def test_x_api_key_stands_in_for_a_missing_authorization_header() -> None:
    assert authorization_or_api_key(None, ["tok"]) == "Bearer tok"
    assert authorization_or_api_key("Bearer a", ["b"]) == "Bearer a"
    assert authorization_or_api_key(None, []) is None
    with pytest.raises(InvalidRequestError):
        authorization_or_api_key(None, ["a", "b"])


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (409, "invalid_request_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "api_error"),
    ],
)
def test_anthropic_error_types_by_status(status: int, kind: str) -> None:
    body = anthropic_body(status, NotFoundError("gone").to_body())
    assert body == {"type": "error", "error": {"type": kind, "message": "gone"}}
