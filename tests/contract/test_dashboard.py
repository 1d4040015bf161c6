"""The dashboard's sign-in and session over plain HTTP on the real local stack: the state
and the PKCE code are checked, the session cookie opens the JSON routes a script reads, a
session's POST needs its CSRF header, and the page carries a strict Content-Security-Policy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from first_local.globus_standin import mint_token
from tests.contract.conftest import Stack

pytestmark = pytest.mark.contract


@contextmanager
def _signed_in(stack: Stack, user: str = "alice") -> Iterator[httpx.Client]:
    """A cookie-keeping client that went through the whole sign-in as `user`."""
    with httpx.Client(follow_redirects=True, timeout=15) as client:
        page = client.get(f"{stack.base_url}/dashboard/login?user={user}")
        assert page.status_code == 200, page.text
        assert str(page.url) == f"{stack.base_url}/dashboard"
        yield client


def _callback_url(stack: Stack, client: httpx.Client) -> str:
    """The address the stand-in sends the browser back to (code and state), not followed."""
    to_globus = client.get(f"{stack.base_url}/dashboard/login", follow_redirects=False)
    back = client.get(to_globus.headers["location"], follow_redirects=False)
    return str(back.headers["location"])


def test_the_signed_in_page_has_a_strict_csp_and_no_inline_script(stack: Stack) -> None:
    with _signed_in(stack) as client:
        page = client.get(f"{stack.base_url}/dashboard")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "http" not in csp
        assert page.text.count("<script") == page.text.count('<script src="dashboard/assets/')
        chart = client.get(f"{stack.base_url}/dashboard/assets/chart.umd.min.js")
        assert chart.status_code == 200 and "Chart.js v4" in chart.text[:200]
        assert client.get(f"{stack.base_url}/dashboard/assets/..%2Fhttp.py").status_code == 404


def test_the_session_cookie_opens_the_json_routes_a_script_reads(stack: Stack) -> None:
    with _signed_in(stack) as client:
        cookie = client.get(f"{stack.base_url}/v1/usage")
        bearer = httpx.get(
            f"{stack.base_url}/v1/usage",
            headers={"Authorization": f"Bearer {mint_token('alice')}"},
        )
        assert cookie.status_code == 200 and cookie.json() == bearer.json()
        assert client.get(f"{stack.base_url}/v1/requests?limit=5").status_code == 200
        session = client.get(f"{stack.base_url}/dashboard/session").json()
        assert session["username"] == "alice@anl.gov" and session["is_admin"] is False
    # A cookie changed by hand is no session.
    forged = httpx.get(
        f"{stack.base_url}/v1/usage",
        headers={"Cookie": "first_session=" + "e30." + "A" * 43},
    )
    assert forged.status_code == 401
    assert forged.json()["error"]["type"] == "authentication_error"


def test_a_sessions_post_needs_its_csrf_header(stack: Stack) -> None:
    url = f"{stack.base_url}/v1/admin/clusters/polaris/maintenance"
    with _signed_in(stack, "dave") as client:
        refused = client.post(url, json={"maintenance": False})
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "csrf_check_failed"
        token = client.get(f"{stack.base_url}/dashboard/session").json()["csrf_token"]
        done = client.post(url, json={"maintenance": False}, headers={"X-FIRST-CSRF": token})
        assert done.status_code == 200 and done.json()["status"] == "online"
    with _signed_in(stack, "alice") as client:
        token = client.get(f"{stack.base_url}/dashboard/session").json()["csrf_token"]
        mine = client.post(url, json={"maintenance": True}, headers={"X-FIRST-CSRF": token})
        assert mine.status_code == 403  # not an admin


def test_the_callback_checks_the_state_and_a_code_works_once(stack: Stack) -> None:
    with httpx.Client(timeout=15) as client:
        back = _callback_url(stack, client)
        wrong = client.get(back.replace("state=", "state=x"))
        assert wrong.status_code == 401 and "sign in again" in wrong.text
        assert "first_session" not in client.cookies
        first = client.get(back)
        assert first.status_code == 302 and first.headers["location"].endswith("/dashboard")
        assert "first_session" in client.cookies
        assert "HttpOnly" in first.headers["set-cookie"]
        # The stand-in, as Globus, takes a code once.
        client.cookies.delete("first_session")
        again = client.get(back)
        assert again.status_code == 401 and "first_session" not in client.cookies


def test_a_browser_without_a_session_is_sent_to_sign_in(stack: Stack) -> None:
    first = httpx.get(f"{stack.base_url}/dashboard?user=dave", follow_redirects=False)
    assert first.status_code == 302
    assert first.headers["location"] == f"{stack.base_url}/dashboard/login?user=dave"
    assert httpx.get(f"{stack.base_url}/dashboard/session").status_code == 401
