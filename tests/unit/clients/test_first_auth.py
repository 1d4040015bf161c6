"""`first-auth` against the Globus stand-in's native-app login, over real HTTP.

The command runs for real (its `main(argv)` in process, and the installed console script
as a subprocess); the only shortcut is that the "browser" is httpx asking the stand-in's
authorize endpoint for `?user=alice` and reading the code off the redirect.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import globus_sdk
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

import first_auth
from first_auth import cli
from first_local import globus_standin
from first_local.globus_standin import (
    DEV_CLIENT_ID,
    DEV_CLIENT_SECRET,
    DEV_GATEWAY_SCOPE,
    DEV_IDENTITIES,
    DEV_NATIVE_CLIENT_ID,
    create_app,
    mint_token,
)
from tests.support.asgi import serve

GATEWAY_RS = DEV_CLIENT_ID


class _Server:
    def __init__(self, app: Starlette, base: str) -> None:
        self.app = app
        self.base = base
        self.auth_url = f"{base}/auth/"


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    app = create_app()
    with serve(app, log_config=None) as url:
        yield _Server(app, url)


@pytest.fixture
def standin(server: _Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> _Server:
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", server.auth_url)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("FIRST_DEV_TOKEN_SECRET", "FIRST_AUTH_CLIENT_ID", "FIRST_AUTH_SCOPE"):
        monkeypatch.delenv(name, raising=False)
    server.app.state.calls.clear()
    return server


def _config(tmp_path: Path) -> Path:
    return tmp_path / "config" / "first"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = first_auth.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _code_from(authorize_url: str, user: str = "alice") -> tuple[str, dict[str, list[str]]]:
    """Play the browser: the stand-in logs `user` in and redirects with the code."""
    resp = httpx.get(f"{authorize_url}&{urlencode({'user': user})}", follow_redirects=False)
    assert resp.status_code == 302, resp.text
    query = parse_qs(urlparse(resp.headers["location"]).query)
    [code] = query["code"]
    return code, query


def _login(capsys: pytest.CaptureFixture[str], user: str = "alice", *extra: str) -> None:
    rc, url, _ = _run(["login", "--start", *extra], capsys)
    assert rc == 0
    code, _ = _code_from(url.strip(), user)
    rc, out, err = _run(["login", "--code", code, *extra], capsys)
    assert rc == 0, err
    assert out == ""
    assert f"Logged in as {DEV_IDENTITIES[user].username}" in err


def _introspect(token: str) -> dict[str, Any]:
    client = globus_sdk.ConfidentialAppAuthClient(DEV_CLIENT_ID, DEV_CLIENT_SECRET)
    return dict(client.oauth2_token_introspect(token, include="identity_set_detail").data)


def _stored(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """The token data in the file, by resource server (one namespace)."""
    content = json.loads((_config(tmp_path) / "tokens.json").read_text())
    [namespace] = content["data"].values()
    return dict(namespace)


def _token(capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    rc, out, err = _run(["token", *extra], capsys)
    assert rc == 0, err
    assert out.endswith("\n") and out.count("\n") == 1  # one line: fit for $(...)
    return out.strip()


def _pkce() -> tuple[str, str]:
    verifier = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.rstrip(b"=").decode()


def _authorize_params(challenge: str, **over: str) -> dict[str, str]:
    params = {
        "client_id": DEV_NATIVE_CLIENT_ID,
        "redirect_uri": "https://example.org/callback",
        "scope": f"openid {DEV_GATEWAY_SCOPE}",
        "state": "s1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "response_type": "code",
        "access_type": "offline",
    }
    params.update(over)
    return params


def test_defaults_equal_the_standins() -> None:
    assert cli.DEV_NATIVE_CLIENT_ID == globus_standin.DEV_NATIVE_CLIENT_ID
    assert cli.DEV_GATEWAY_SCOPE == globus_standin.DEV_GATEWAY_SCOPE
    assert cli.resource_server_of(cli.DEV_GATEWAY_SCOPE) == DEV_CLIENT_ID


def test_package_does_not_import_the_project() -> None:
    source = Path(cli.__file__).read_text()
    assert "first_local" not in source.replace("first_local.globus_standin", "")
    assert "import first_local" not in source and "first_core" not in source


def test_resource_server_of() -> None:
    assert cli.resource_server_of("https://auth.globus.org/scopes/abc/all[x]") == "abc"
    assert cli.resource_server_of("urn:globus:auth:scope:transfer.api.globus.org:all") == (
        "transfer.api.globus.org"
    )
    with pytest.raises(cli.CommandError):
        cli.resource_server_of("openid")


def test_login_then_token_is_alice_with_the_gateway_scope(
    standin: _Server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _login(capsys)
    tokens_file = _config(tmp_path) / "tokens.json"
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(_config(tmp_path).stat().st_mode) == 0o700
    assert not (_config(tmp_path) / "pending-login.json").exists()

    stored = _stored(tmp_path)
    assert set(stored) == {GATEWAY_RS, "auth.globus.org"}
    alice = DEV_IDENTITIES["alice"]
    for data in stored.values():
        assert data["identity_id"] == alice.sub
        assert data["refresh_token"]
        # Every token in the file is alice's, none anybody else's.
        assert _introspect(data["access_token"])["username"] == alice.username
    text = tokens_file.read_text()
    for other in ("bob", "carol", "dave"):
        assert DEV_IDENTITIES[other].sub not in text

    token = _token(capsys)
    assert token == stored[GATEWAY_RS]["access_token"]  # still fresh: no refresh
    data = _introspect(token)
    assert data["active"] is True
    assert data["username"] == "alice@anl.gov"
    assert data["scope"] == DEV_GATEWAY_SCOPE
    assert data["client_id"] == DEV_NATIVE_CLIENT_ID
    assert DEV_CLIENT_ID in data["aud"]
    assert data["exp"] - time.time() > 47 * 3600
    # The same kind of token mint_token makes: same claims, same prefix.
    assert token.split(".")[0] == mint_token("alice").split(".")[0]
    assert standin.app.state.calls["token_grants"] == 1  # the code exchange, nothing else

    rc, out, _ = _run(["whoami"], capsys)
    assert (rc, out) == (0, "alice@anl.gov\n")
    rc, _, err = _run(["login"], capsys)
    assert rc == 0 and "Already logged in as alice@anl.gov" in err


def test_interactive_login_through_the_console_script(
    standin: _Server, tmp_path: Path
) -> None:
    script = Path(sys.executable).parent / "first-auth"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "first_auth"]
    env = {
        **os.environ,
        "GLOBUS_SDK_SERVICE_URL_AUTH": standin.auth_url,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    proc = subprocess.Popen(
        [*command, "login"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None and proc.stdin is not None
    url = ""
    while not url:
        line = proc.stderr.readline()
        assert line, "first-auth login printed no authorize URL"
        if line.strip().startswith("http"):
            url = line.strip()
    assert url.startswith(f"{standin.auth_url}v2/oauth2/authorize?")
    query = parse_qs(urlparse(url).query)
    assert query["client_id"] == [DEV_NATIVE_CLIENT_ID]
    assert query["code_challenge_method"] == ["S256"]
    assert query["access_type"] == ["offline"]
    assert DEV_GATEWAY_SCOPE in query["scope"][0].split()
    code, _ = _code_from(url, "dave")
    out, err = proc.communicate(code + "\n", timeout=60)
    assert proc.returncode == 0, err
    assert out == ""  # prompts go to stderr
    assert "Logged in as dave@anl.gov" in err

    token = subprocess.run(
        [*command, "token"], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    data = _introspect(token)
    assert data["active"] is True and data["username"] == "dave@anl.gov"
    assert data["scope"] == DEV_GATEWAY_SCOPE


def test_token_refreshes_when_about_to_expire(
    standin: _Server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _login(capsys)
    old = _stored(tmp_path)[GATEWAY_RS]
    # Make the stored access token expire in 30 s: under the minute `token` insists on.
    content = json.loads((_config(tmp_path) / "tokens.json").read_text())
    [namespace] = content["data"].values()
    namespace[GATEWAY_RS]["expires_at_seconds"] = int(time.time()) + 30
    (_config(tmp_path) / "tokens.json").write_text(json.dumps(content))
    grants = standin.app.state.calls["token_grants"]

    fresh = _token(capsys)
    assert fresh != old["access_token"]
    assert standin.app.state.calls["token_grants"] == grants + 1  # one refresh grant
    data = _introspect(fresh)
    assert data["active"] is True
    assert data["username"] == "alice@anl.gov"
    assert data["scope"] == DEV_GATEWAY_SCOPE
    stored = _stored(tmp_path)[GATEWAY_RS]
    assert stored["access_token"] == fresh
    assert stored["expires_at_seconds"] > time.time() + 3600
    assert stored["refresh_token"] == old["refresh_token"]
    assert stat.S_IMODE((_config(tmp_path) / "tokens.json").stat().st_mode) == 0o600

    assert _token(capsys) == fresh  # fresh now: no second refresh
    assert standin.app.state.calls["token_grants"] == grants + 1
    forced = _token(capsys, "--min-valid", str(49 * 3600))  # longer than any token lives
    assert forced != fresh and _introspect(forced)["active"] is True


def test_short_lived_tokens_are_refreshed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A stand-in that issues 50-second tokens: every `token` call must refresh.
    app = create_app(access_token_lifetime_s=50)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    try:
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
        auth_url = f"http://127.0.0.1:{sock.getsockname()[1]}/auth/"
        # --auth-url sets this for the process: let monkeypatch put it back afterwards.
        monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", "http://127.0.0.1:9/nowhere/")
        _login(capsys, "alice", "--auth-url", auth_url)
        issued = _stored(tmp_path)[GATEWAY_RS]["access_token"]
        first = _token(capsys, "--auth-url", auth_url)
        second = _token(capsys, "--auth-url", auth_url)
        assert len({issued, first, second}) == 3
        for token in (first, second):
            data = _introspect(token)
            assert data["active"] is True and data["username"] == "alice@anl.gov"
            assert 0 < data["exp"] - time.time() <= 50
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_logout_revokes_and_deletes(
    standin: _Server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _login(capsys)
    stored = _stored(tmp_path)
    token = _token(capsys)
    assert _introspect(token)["active"] is True

    rc, out, err = _run(["logout"], capsys)
    assert rc == 0 and "Logged out" in err
    assert not (_config(tmp_path) / "tokens.json").exists()
    assert standin.app.state.calls["revoke"] == 4  # two resource servers, access + refresh
    assert _introspect(token) == {"active": False}
    with pytest.raises(globus_sdk.AuthAPIError) as refused:
        globus_sdk.NativeAppAuthClient(DEV_NATIVE_CLIENT_ID).oauth2_refresh_token(
            stored[GATEWAY_RS]["refresh_token"]
        )
    assert refused.value.http_status == 400

    rc, out, err = _run(["token"], capsys)
    assert rc == 1 and out == ""
    assert "not logged in" in err and "first-auth login" in err
    rc, _, err = _run(["logout"], capsys)
    assert rc == 0 and "Not logged in" in err


def test_token_before_any_login(standin: _Server, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(["token"], capsys)
    assert (rc, out) == (1, "")
    assert "run `first-auth login`" in err
    rc, _, err = _run(["whoami"], capsys)
    assert rc == 1 and "first-auth login" in err


def test_code_without_a_started_login(
    standin: _Server, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = _run(["login", "--code", "whatever"], capsys)
    assert rc == 1 and "first-auth login --start" in err


def test_another_user_cannot_log_in_over_a_login(
    standin: _Server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _login(capsys)
    before = (_config(tmp_path) / "tokens.json").read_text()
    rc, url, _ = _run(["login", "--start"], capsys)
    code, _ = _code_from(url.strip(), "bob")
    rc, _, err = _run(["login", "--code", code], capsys)
    assert rc == 1 and "first-auth logout" in err
    assert (_config(tmp_path) / "tokens.json").read_text() == before  # bob's never stored
    assert DEV_IDENTITIES["bob"].sub not in before
    _run(["logout"], capsys)
    _login(capsys, "bob")
    assert _introspect(_token(capsys))["username"] == "bob@uchicago.edu"


def test_wrong_pkce_verifier_is_refused(standin: _Server) -> None:
    client = globus_sdk.NativeAppAuthClient(DEV_NATIVE_CLIENT_ID)
    client.oauth2_start_flow(DEV_GATEWAY_SCOPE, refresh_tokens=True)
    code, query = _code_from(client.oauth2_get_authorize_url())
    assert query["state"] == ["_default"]
    right = client.current_oauth2_flow_manager
    client.oauth2_start_flow(DEV_GATEWAY_SCOPE, refresh_tokens=True)  # a new verifier
    with pytest.raises(globus_sdk.AuthAPIError) as refused:
        client.oauth2_exchange_code_for_tokens(code)
    assert refused.value.http_status == 400
    assert refused.value.raw_json is not None
    assert refused.value.raw_json["error"] == "invalid_grant"
    assert "code_verifier" in refused.value.raw_json["error_description"]
    # No verifier at all is refused too, and the right one still works afterwards.
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "client_id": DEV_NATIVE_CLIENT_ID,
        "redirect_uri": f"{standin.auth_url}v2/web/auth-code",
    }
    assert httpx.post(f"{standin.auth_url}v2/oauth2/token", data=form).status_code == 400
    assert right is not None
    client.current_oauth2_flow_manager = right
    tokens = client.oauth2_exchange_code_for_tokens(code)
    assert _introspect(tokens.by_resource_server[GATEWAY_RS]["access_token"])["active"] is True
    # A code is good once.
    with pytest.raises(globus_sdk.AuthAPIError):
        client.oauth2_exchange_code_for_tokens(code)


def test_token_response_shape(standin: _Server) -> None:
    verifier, challenge = _pkce()
    resp = httpx.get(
        f"{standin.auth_url}v2/oauth2/authorize",
        params={**_authorize_params(challenge), "user": "carol"},
    )
    assert resp.status_code == 302
    location = urlparse(resp.headers["location"])
    assert location.netloc == "example.org" and location.path == "/callback"
    query = parse_qs(location.query)
    assert query["state"] == ["s1"]
    form = {
        "grant_type": "authorization_code",
        "code": query["code"][0],
        "code_verifier": verifier,
        "client_id": DEV_NATIVE_CLIENT_ID,
        "redirect_uri": "https://example.org/callback",
    }
    body = httpx.post(f"{standin.auth_url}v2/oauth2/token", data=form).json()
    # As Globus: the Auth token on top with the id_token, the gateway's in other_tokens.
    assert body["resource_server"] == "auth.globus.org" and body["scope"] == "openid"
    assert body["token_type"] == "Bearer" and body["expires_in"] == 48 * 3600
    assert body["id_token"].count(".") == 2
    [gateway] = body["other_tokens"]
    assert set(gateway) == {
        "access_token",
        "expires_in",
        "resource_server",
        "scope",
        "token_type",
        "refresh_token",
    }
    assert gateway["resource_server"] == GATEWAY_RS and gateway["scope"] == DEV_GATEWAY_SCOPE
    assert _introspect(gateway["access_token"])["username"] == "carol@example.org"
    # Refresh and code tokens are not access tokens: introspection says inactive.
    assert _introspect(gateway["refresh_token"]) == {"active": False}
    assert _introspect(query["code"][0]) == {"active": False}

    refreshed = httpx.post(
        f"{standin.auth_url}v2/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": gateway["refresh_token"],
            "client_id": DEV_NATIVE_CLIENT_ID,
        },
    ).json()
    assert refreshed["other_tokens"] == [] and "id_token" not in refreshed
    assert refreshed["resource_server"] == GATEWAY_RS
    assert refreshed["access_token"] != gateway["access_token"]
    assert _introspect(refreshed["access_token"])["active"] is True
    # Another client cannot use carol's refresh token.
    stolen = httpx.post(
        f"{standin.auth_url}v2/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": gateway["refresh_token"],
            "client_id": DEV_CLIENT_ID,
        },
    )
    assert stolen.status_code == 401


def test_gateway_scope_alone_and_online_access(standin: _Server) -> None:
    verifier, challenge = _pkce()
    params = _authorize_params(challenge, scope=DEV_GATEWAY_SCOPE, access_type="online")
    resp = httpx.get(f"{standin.auth_url}v2/oauth2/authorize", params=params)
    code = parse_qs(urlparse(resp.headers["location"]).query)["code"][0]
    body = httpx.post(
        f"{standin.auth_url}v2/oauth2/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "client_id": DEV_NATIVE_CLIENT_ID,
            "redirect_uri": "https://example.org/callback",
        },
    ).json()
    assert body["resource_server"] == GATEWAY_RS and body["other_tokens"] == []
    assert "refresh_token" not in body and "id_token" not in body
    assert _introspect(body["access_token"])["username"] == "alice@anl.gov"


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": ""}, "invalid_request"),
        ({"user": "mallory"}, "invalid_request"),
        ({"client_id": DEV_CLIENT_ID}, "invalid_client"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": ""}, "invalid_request"),
    ],
)
def test_authorize_refuses_bad_requests(
    standin: _Server, override: dict[str, str], error: str
) -> None:
    _, challenge = _pkce()
    resp = httpx.get(
        f"{standin.auth_url}v2/oauth2/authorize", params=_authorize_params(challenge, **override)
    )
    assert resp.status_code == 400
    assert resp.json()["error"] == error


def test_auth_code_page_and_oidc_discovery(standin: _Server) -> None:
    page = httpx.get(f"{standin.auth_url}v2/web/auth-code", params={"code": "abc"})
    assert page.status_code == 200 and "abc" in page.text
    oidc = httpx.get(f"{standin.auth_url}.well-known/openid-configuration").json()
    assert oidc["jwks_uri"] == f"{standin.auth_url}jwk.json"
    assert oidc["code_challenge_methods_supported"] == ["S256"]
    [key] = httpx.get(oidc["jwks_uri"]).json()["keys"]
    assert key["kty"] == "RSA" and key["alg"] == oidc["id_token_signing_alg_values_supported"][0]


def test_stack_state_file_selects_the_standin(
    standin: _Server,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    state = tmp_path / "stack.json"
    state.write_text(json.dumps({"globus_auth_url": standin.auth_url}))
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", "http://127.0.0.1:9/nowhere/")
    rc, url, _ = _run(["login", "--start", "--stack-state", str(state)], capsys)
    assert rc == 0 and url.startswith(standin.auth_url)
    rc, _, err = _run(["token", "--stack-state", str(tmp_path / "missing.json")], capsys)
    assert rc == 2 and f"no state file at {tmp_path / 'missing.json'}" in err


def test_the_running_local_stack_is_found_with_nothing_exported(
    standin: _Server,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """With the stand-in's native app (the default) and no Globus address given, first-auth
    uses the stack `first-gateway dev` wrote to the default state file."""
    monkeypatch.delenv("GLOBUS_SDK_SERVICE_URL_AUTH")
    monkeypatch.delenv("FIRST_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    state = {
        "base_url": standin.base,  # answers HTTP, as the gateway would
        "globus_auth_url": standin.auth_url,
        "pid": os.getpid(),  # alive
    }
    (tmp_path / "run" / "first").mkdir(parents=True)
    (tmp_path / "run" / "first" / "stack.json").write_text(json.dumps(state))
    rc, url, err = _run(["login", "--start"], capsys)
    assert rc == 0 and url.startswith(f"{standin.auth_url}v2/oauth2/authorize?")
    assert f"acting on the local stack at {standin.base}" in err
    code, _ = _code_from(url.strip())
    rc, _, _ = _run(["login", "--code", code], capsys)
    assert rc == 0
    rc, token, _ = _run(["token"], capsys)
    assert rc == 0 and globus_standin.tokens._verify(token.strip(), None) is not None


def test_no_running_local_stack_is_one_line_and_exit_2(standin: _Server, tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    first_auth_bin = str(Path(sys.executable).with_name("first-auth"))
    stale = tmp_path / ".cache" / "first" / "stack.json"
    for setup in ("none", "stale"):
        if setup == "stale":  # a stack that has stopped without removing its file
            stale.parent.mkdir(parents=True)
            child = subprocess.Popen(["true"])
            child.wait()
            gone = {"base_url": standin.base, "globus_auth_url": standin.auth_url, "pid": child.pid}
            stale.write_text(json.dumps(gone))
        result = subprocess.run(
            [first_auth_bin, "token"], capture_output=True, text=True, env=env, timeout=60
        )
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("first-auth: ")
        assert "first-gateway dev" in line and "FIRST_AUTH_CLIENT_ID" in line


def test_console_script_is_installed() -> None:
    assert shutil.which("first-auth", path=str(Path(sys.executable).parent))
