"""The dashboard at /dashboard: the page and its assets, sign-in through Globus (authorization
code with PKCE), and the session (first_core.dashboard). The page itself reads the JSON routes
a script would (`/v1/usage`, `/v1/requests`, `/v1/models`, ...) with the session cookie."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from chalice import Blueprint, Response

from chalicelib.http import base_url, client_address, header, is_https, query, route
from first_core.dashboard import pages, sessions, signin
from first_core.errors import AuthenticationError, GatewayError

dashboard = Blueprint(__name__)
ASSETS = Path(__file__).parent / "dashboard_assets"


def _redirect(location: str, *cookies: str) -> Response:
    headers: dict[str, Any] = {"Location": location}
    if cookies:
        headers["Set-Cookie"] = list(cookies)
    return Response("", status_code=302, headers=headers)


def _page(body: str, status: int = 200, content_type: str = pages.ASSET_TYPES[".html"]) -> Response:
    return Response(
        body, status_code=status, headers={"Content-Type": content_type, **pages.PAGE_HEADERS}
    )


@route(dashboard, "/dashboard", methods=["GET"])
def dashboard_page() -> Response:
    """The dashboard for a signed-in browser; anyone else is sent to sign in."""
    if sessions.read(header("cookie")) is None:
        user = pages.dev_user(query().get("user"))
        return _redirect(f"{base_url()}/dashboard/login" + (f"?user={user}" if user else ""))
    return _page(pages.asset(ASSETS, "index.html")[0])


@route(dashboard, "/dashboard/assets/{name}", methods=["GET"])
def dashboard_asset(name: str) -> Response:
    """The page's script, style and Chart.js (shipped with the app)."""
    text, content_type = pages.asset(ASSETS, name)
    return _page(text, content_type=content_type)


@route(dashboard, "/dashboard/login", methods=["GET"])
def dashboard_login() -> Response:
    """Start a sign-in: remember its state in a short cookie, go to Globus's authorize page."""
    state, login_cookie = sessions.begin_login()
    url = signin.authorize_url(base_url(), state, pages.dev_user(query().get("user")))
    cookie = sessions.set_cookie(
        sessions.LOGIN_COOKIE, login_cookie, sessions.LOGIN_SECONDS, is_https()
    )
    return _redirect(url, cookie)


@route(dashboard, "/dashboard/callback", methods=["GET"])
def dashboard_callback() -> Response:
    """Globus sends the browser back here with a code: check the state, trade the code (PKCE),
    check the caller as any bearer token is, and start the session (no token kept)."""
    params, secure = query(), is_https()
    try:
        if "error" in params:
            raise AuthenticationError(
                f"Globus: {params.get('error_description') or params['error']}"
            )
        state = sessions.check_login(header("cookie"), params.get("state"))
        who = signin.finish(base_url(), state, params.get("code", ""), client_address())
    except GatewayError as error:
        page = pages.signin_failed(error, f"{base_url()}/dashboard/login")
        return _page(page, status=error.status)
    session, value = sessions.start(who)
    max_age = int(session.expires_at - time.time())
    return _redirect(
        f"{base_url()}/dashboard",
        sessions.set_cookie(sessions.SESSION_COOKIE, value, max_age, secure),
        sessions.clear_cookie(sessions.LOGIN_COOKIE, secure),
    )


@route(dashboard, "/dashboard/session", methods=["GET"])
def dashboard_session() -> dict[str, Any]:
    """Who is signed in, whether an admin, until when, and the CSRF value for their POSTs."""
    session = sessions.read(header("cookie"))
    if session is None:
        raise AuthenticationError("Not signed in to the dashboard.", code="no_session")
    who = session.caller
    return {
        "user_id": who.user_id,
        "username": who.username,
        "name": who.name,
        "is_admin": who.is_admin,
        "expires_at": session.expires_at,
        "csrf_token": sessions.csrf_token(session),
    }


@route(dashboard, "/dashboard/logout", methods=["POST"])
def dashboard_logout() -> Response:
    """End the session (a POST with the session's CSRF header)."""
    session = sessions.read(header("cookie"))
    if session is not None:
        sessions.check_csrf(session, header(sessions.CSRF_HEADER))
    cookie = sessions.clear_cookie(sessions.SESSION_COOKIE, is_https())
    return Response({"signed_out": True}, status_code=200, headers={"Set-Cookie": [cookie]})
