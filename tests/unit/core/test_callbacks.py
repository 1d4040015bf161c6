"""Callback tokens (first_core.callbacks): one per request, derived from the secret, checked in
constant time, and nothing but the exact token accepted."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import SecretStr

import first_core.callbacks
import first_core.inference.results
import first_core.storage
from first_core.callbacks import callback_token, verify_callback_token
from first_core.errors import (
    AuthenticationError,
)
from first_core.settings import get_settings

REQUEST_ID = "req_00000000000000000000000000000001"
OTHER_ID = "req_00000000000000000000000000000002"


# -- callback tokens --------------------------------------------------------------------------
def test_callback_token_is_deterministic_per_request_and_differs_across_requests() -> None:
    token = callback_token(REQUEST_ID)

    assert token == callback_token(REQUEST_ID)
    assert token != callback_token(OTHER_ID)
    assert len(token) == 64
    int(token, 16)  # hex


def test_callback_token_is_the_hmac_of_the_request_id_under_the_secret() -> None:
    secret = os.environ["FIRST_CALLBACK_SECRET"].encode()
    expected = hmac.new(secret, REQUEST_ID.encode(), hashlib.sha256).hexdigest()

    assert callback_token(REQUEST_ID) == expected


def test_callback_token_changes_with_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    before = callback_token(REQUEST_ID)
    monkeypatch.setattr(get_settings(), "callback_secret", SecretStr("x"))

    assert callback_token(REQUEST_ID) != before


def test_callback_tokens_refuse_to_work_without_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "callback_secret", SecretStr(""))

    with pytest.raises(Exception):  # noqa: B017 - any refusal will do
        callback_token(REQUEST_ID)


def test_verify_callback_token_accepts_the_right_token() -> None:
    verify_callback_token(REQUEST_ID, f"Bearer {callback_token(REQUEST_ID)}")


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer ",
        "Bearer not-the-token",
        f"Bearer {callback_token(OTHER_ID)}",
        f"Bearer {callback_token(REQUEST_ID)[:-1]}",
        f"Bearer {callback_token(REQUEST_ID)[:32]}",
        f"Bearer {callback_token(REQUEST_ID)}0",
        f"Bearer {callback_token(REQUEST_ID).upper()}",
    ],
    ids=[
        "none",
        "empty",
        "bare",
        "wrong",
        "other-request",
        "prefix-63",
        "prefix-32",
        "extended",
        "uppercased",
    ],
)
def test_verify_callback_token_refuses_anything_else(authorization: str | None) -> None:
    with pytest.raises(AuthenticationError) as refused:
        verify_callback_token(REQUEST_ID, authorization)

    assert refused.value.status == 401
    assert refused.value.code == "invalid_callback"


def test_verify_callback_token_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, bytes]] = []
    real: Callable[[Any, Any], bool] = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(first_core.callbacks.hmac, "compare_digest", spy)
    token = callback_token(REQUEST_ID)

    verify_callback_token(REQUEST_ID, f"Bearer {token}")
    with pytest.raises(AuthenticationError):
        verify_callback_token(REQUEST_ID, "Bearer wrong")

    assert seen == [(token.encode(), token.encode()), (b"wrong", token.encode())]
