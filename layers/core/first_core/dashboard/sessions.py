"""The dashboard's session: a signed cookie, never a token.

After sign-in the browser holds one cookie, `first_session`: the caller's identity, groups and
the session's expiry, as base64url JSON followed by an HMAC-SHA256 of it (checked in constant
time). No Globus token is kept anywhere: the cookie says who the gateway found the caller to
be, until it expires (`FIRST_DASHBOARD_SESSION_SECONDS`). It is `HttpOnly` (no script reads
it), `SameSite=Lax` (no other site's POST carries it), and `Secure` when the browser reached the
gateway over https (on AWS always; not on the local stack's http).

The sign-in's own short cookie, `first_login`, carries the OAuth `state` the callback must echo;
the PKCE verifier is derived from that state with the same key, so the gateway stores nothing
between the two redirects. A POST that a session makes must also carry `X-FIRST-CSRF`, a
value bound to the session (the page reads it from `GET /dashboard/session`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from first_core.auth import Caller
from first_core.errors import AuthenticationError, PermissionDeniedError, ServiceUnavailableError
from first_core.settings import get_settings

SESSION_COOKIE = "first_session"
LOGIN_COOKIE = "first_login"
CSRF_HEADER = "x-first-csrf"
# Ten minutes to come back from Globus's login page.
LOGIN_SECONDS = 600
# What the cookie keeps of a caller: who they are and their groups (the admin verdict follows
# from them), nothing about the token they signed in with.
_IDENTITY_FIELDS = ("user_id", "username", "name", "email", "idp_domain", "idp_name")


@dataclass(frozen=True)
class Session:
    """A signed-in browser: who, and until when."""

    caller: Caller
    session_id: str
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key() -> bytes:
    """The signing key: its own secret, or one derived from the callback secret (a key for
    another purpose never signs callbacks, and the reverse)."""
    s = get_settings()
    own = s.dashboard_session_secret.get_secret_value()
    if own:
        return own.encode()
    callback = s.callback_secret.get_secret_value()
    if not callback:
        raise ServiceUnavailableError("The dashboard's session secret is not configured.")
    return hmac.new(callback.encode(), b"first-dashboard-session", hashlib.sha256).digest()


def _mac(purpose: str, body: str) -> str:
    return _b64(hmac.new(_key(), f"{purpose}.{body}".encode(), hashlib.sha256).digest())


def seal(purpose: str, payload: dict[str, Any]) -> str:
    """`payload` as base64url JSON and its HMAC, for `purpose` only."""
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    return f"{body}.{_mac(purpose, body)}"


def unseal(purpose: str, value: str | None, now: float | None = None) -> dict[str, Any] | None:
    """The payload `seal` made for `purpose`, if the MAC matches and `exp` has not passed."""
    if not value or value.count(".") != 1:
        return None
    body, mac = value.split(".")
    if not hmac.compare_digest(mac.encode(), _mac(purpose, body).encode()):
        return None
    try:
        payload = json.loads(_unb64(body))
    except ValueError:
        return None
    if not isinstance(payload, dict) or float(payload.get("exp", 0)) <= (now or time.time()):
        return None
    return payload


def cookies(header: str | None) -> dict[str, str]:
    """A Cookie header's name=value pairs (the last of a repeated name wins)."""
    found: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            found[name] = value.strip().strip('"')
    return found


# ---- the session --------------------------------------------------------------------------------


def start(caller: Caller, now: float | None = None) -> tuple[Session, str]:
    """A new session for a signed-in caller, and its cookie's value."""
    now = now or time.time()
    expires_at = now + get_settings().dashboard_session_seconds
    session_id = secrets.token_urlsafe(16)
    payload = {
        **{name: getattr(caller, name) for name in _IDENTITY_FIELDS},
        "groups": sorted(caller.groups),
        "sid": session_id,
        "exp": expires_at,
    }
    session = Session(_caller(payload, now), session_id, expires_at)
    return session, seal("session", payload)


def read(cookie_header: str | None) -> Session | None:
    """The session the request's cookie names, if it is genuine and unexpired."""
    payload = unseal("session", cookies(cookie_header).get(SESSION_COOKIE))
    if payload is None or not isinstance(payload.get("groups"), list):
        return None
    try:
        return Session(_caller(payload, time.time()), str(payload["sid"]), float(payload["exp"]))
    except (KeyError, TypeError, ValueError):
        return None


def _caller(payload: dict[str, Any], now: float) -> Caller:
    return Caller(
        user_id=str(payload["user_id"]),
        username=str(payload["username"]),
        name=str(payload["name"]),
        email=str(payload["email"]),
        idp_domain=str(payload["idp_domain"]),
        idp_name=str(payload["idp_name"]),
        groups=frozenset(str(group) for group in payload["groups"]),
        groups_checked_at=now,
        verdict_expires_at=float(payload["exp"]),
        token_expires_at=float(payload["exp"]),
    )


def csrf_token(session: Session) -> str:
    """The value a session's POSTs carry in `X-FIRST-CSRF` (bound to this session only)."""
    return _mac("csrf", session.session_id)


def check_csrf(session: Session, given: str | None) -> None:
    """403 unless `given` is the session's CSRF value (compared in constant time)."""
    if not given or not hmac.compare_digest(given.encode(), csrf_token(session).encode()):
        raise PermissionDeniedError(
            "This request needs the dashboard's X-FIRST-CSRF header.", code="csrf_check_failed"
        )


# ---- the sign-in between its two redirects ------------------------------------------------------


def begin_login(now: float | None = None) -> tuple[str, str]:
    """A fresh OAuth state and the `first_login` cookie's value that remembers it."""
    state = secrets.token_urlsafe(24)
    return state, seal("login", {"state": state, "exp": (now or time.time()) + LOGIN_SECONDS})


def pkce_verifier(state: str) -> str:
    """The PKCE code verifier of the sign-in with this state: 43 base64url characters, which
    only the gateway can derive (so it keeps no store between the redirects)."""
    return _b64(hmac.new(_key(), f"pkce.{state}".encode(), hashlib.sha256).digest())


def check_login(cookie_header: str | None, state: str | None) -> str:
    """The state of the sign-in this browser started, if the callback echoes it; else 401."""
    payload = unseal("login", cookies(cookie_header).get(LOGIN_COOKIE))
    expected = str(payload.get("state", "")) if payload else ""
    if not expected or not state or not hmac.compare_digest(expected.encode(), state.encode()):
        raise AuthenticationError(
            "The sign-in could not be matched to this browser (state mismatch or expired); "
            "sign in again.",
            code="invalid_state",
        )
    return expected


# ---- Set-Cookie ---------------------------------------------------------------------------------


def set_cookie(name: str, value: str, max_age: int, secure: bool, path: str = "/") -> str:
    """A Set-Cookie value: HttpOnly, SameSite=Lax, Secure over https."""
    flags = f"; Max-Age={max_age}; Path={path}; HttpOnly; SameSite=Lax"
    return f"{name}={value}{flags}{'; Secure' if secure else ''}"


def clear_cookie(name: str, secure: bool, path: str = "/") -> str:
    """A Set-Cookie value that deletes the cookie."""
    return set_cookie(name, "", 0, secure, path)
