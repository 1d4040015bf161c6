"""The dashboard's session cookie, sign-in state, PKCE verifier and CSRF value
(first_core.dashboard.sessions)."""

from __future__ import annotations

import base64
import json
import time

import pytest
from pydantic import SecretStr

from first_core.dashboard import sessions
from first_core.errors import AuthenticationError, PermissionDeniedError
from first_core.settings import get_settings
from tests.support.identities import ALICE


def _cookie(value: str) -> str:
    return f"other=1; {sessions.SESSION_COOKIE}={value}"


def test_a_session_cookie_reads_back_as_its_caller_and_holds_no_token() -> None:
    session, value = sessions.start(ALICE)
    read = sessions.read(_cookie(value))
    assert read is not None
    assert read.caller.user_id == ALICE.user_id
    assert read.caller.username == ALICE.username
    assert read.caller.groups == ALICE.groups
    assert read.session_id == session.session_id
    payload = json.loads(base64.urlsafe_b64decode(value.split(".")[0] + "=="))
    assert set(payload) == {
        "user_id", "username", "name", "email", "idp_domain", "idp_name", "groups", "sid", "exp"
    }  # fmt: skip


def test_a_session_lasts_the_configured_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "dashboard_session_seconds", 1800)
    session, _ = sessions.start(ALICE, now=1000.0)
    assert session.expires_at == 2800.0


def test_a_changed_or_forged_cookie_is_no_session() -> None:
    _, value = sessions.start(ALICE)
    body, mac = value.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=="))
    payload["user_id"] = "mallory-id"
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    assert sessions.read(_cookie(f"{forged}.{mac}")) is None
    assert sessions.read(_cookie(f"{body}.{mac[:-2]}AA")) is None
    assert sessions.read(_cookie(body)) is None
    assert sessions.read(None) is None
    # A value sealed for another purpose (the sign-in's state) is not a session.
    _, login = sessions.begin_login()
    assert sessions.read(_cookie(login)) is None


def test_an_expired_session_is_no_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "dashboard_session_seconds", 60)
    _, value = sessions.start(ALICE, now=time.time() - 61)
    assert sessions.read(_cookie(value)) is None


def test_a_cookie_signed_with_another_secret_is_no_session(monkeypatch: pytest.MonkeyPatch) -> None:
    _, value = sessions.start(ALICE)
    monkeypatch.setattr(get_settings(), "dashboard_session_secret", SecretStr("another-secret"))
    assert sessions.read(_cookie(value)) is None


def test_the_callback_must_echo_the_state_this_browser_started_with() -> None:
    state, login = sessions.begin_login()
    header = f"{sessions.LOGIN_COOKIE}={login}"
    assert sessions.check_login(header, state) == state
    with pytest.raises(AuthenticationError):
        sessions.check_login(header, state + "x")
    with pytest.raises(AuthenticationError):
        sessions.check_login(None, state)
    other_state, _ = sessions.begin_login()
    with pytest.raises(AuthenticationError):
        sessions.check_login(header, other_state)


def test_the_pkce_verifier_is_rfc_7636_shaped_and_bound_to_the_state() -> None:
    verifier = sessions.pkce_verifier("state-1")
    assert len(verifier) == 43
    assert set(verifier) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert verifier == sessions.pkce_verifier("state-1")
    assert verifier != sessions.pkce_verifier("state-2")


def test_a_sessions_post_needs_its_own_csrf_value() -> None:
    session, _ = sessions.start(ALICE)
    other, _ = sessions.start(ALICE)
    sessions.check_csrf(session, sessions.csrf_token(session))
    for given in (None, "", sessions.csrf_token(other)):
        with pytest.raises(PermissionDeniedError):
            sessions.check_csrf(session, given)


def test_the_cookie_is_httponly_lax_and_secure_only_over_https() -> None:
    over_https = sessions.set_cookie("first_session", "v", 2700, secure=True)
    over_http = sessions.set_cookie("first_session", "v", 2700, secure=False)
    for cookie in (over_https, over_http):
        assert "; HttpOnly" in cookie and "; SameSite=Lax" in cookie and "Max-Age=2700" in cookie
    assert over_https.endswith("; Secure")
    assert "Secure" not in over_http
    assert "Max-Age=0" in sessions.clear_cookie("first_session", secure=False)
