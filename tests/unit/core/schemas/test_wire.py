"""The wire contract with compute_funcs: the one reading of "is this stream chunk an error?"."""

from __future__ import annotations

from typing import Any

import pytest

from first_core.schemas.wire import chunk_error

ERROR = {"message": "context too long", "type": "invalid_request_error", "code": 400}


@pytest.mark.parametrize(
    ("chunk", "error"),
    [
        ('{"error": {"message": "context too long", "type": "invalid_request_error", '
         '"code": 400}}', ERROR),
        ({"error": ERROR}, ERROR),
        ('{"id": "c", "choices": [{"delta": {"content": "error"}}]}', None),
        ({"choices": [], "error": ERROR}, None),  # a chunk with choices is content
        ('{"error": "not an object"}', None),
        ("not json with \"error\" in it", None),
        ('{"choices": [], "usage": {"total_tokens": 3}}', None),
    ],
)
def test_chunk_error(chunk: Any, error: dict[str, Any] | None) -> None:
    assert chunk_error(chunk) == error
