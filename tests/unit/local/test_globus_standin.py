"""The Globus stand-in, driven through the real globus-sdk clients over HTTP."""

from __future__ import annotations

import logging
import string
import time
from collections.abc import Iterator
from typing import Any

import globus_sdk
import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from first_local.globus_standin import (
    ADMIN_GROUP_ID,
    ALLOWED_GROUP_ID,
    COMPUTE_SCOPE,
    DEV_CLIENT_ID,
    DEV_CLIENT_SECRET,
    DEV_GATEWAY_SCOPE,
    DEV_IDENTITIES,
    DEV_SERVICE_CLIENT_ID,
    DEV_SERVICE_CLIENT_SECRET,
    create_app,
    mint_token,
)
from tests.support.asgi import serve

GROUPS_RS = "groups.api.globus.org"
PASSING_POLICY = "11111111-2222-3333-4444-555555555555"
FAILING_POLICY = "66666666-7777-8888-9999-000000000000"


class _Server:
    def __init__(self, app: Starlette, base: str) -> None:
        self.app = app
        self.base = base


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    app = create_app(failing_policies=frozenset({FAILING_POLICY}))
    # log_config=None leaves logging alone, so caplog sees uvicorn's records too.
    with serve(app, log_config=None, log_level="info") as url:
        yield _Server(app, url)


@pytest.fixture
def standin(server: _Server, monkeypatch: pytest.MonkeyPatch) -> _Server:
    # globus-sdk resolves these when a client is constructed, so set them first.
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", f"{server.base}/auth/")
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_GROUPS", f"{server.base}/groups/")
    monkeypatch.delenv("FIRST_DEV_TOKEN_SECRET", raising=False)
    server.app.state.calls.clear()
    return server


def _auth_client(secret: str = DEV_CLIENT_SECRET) -> globus_sdk.ConfidentialAppAuthClient:
    return globus_sdk.ConfidentialAppAuthClient(DEV_CLIENT_ID, secret)


def _introspect(token: str, **form: str) -> dict[str, Any]:
    # The SDK's oauth2_token_introspect has no authentication_policies argument;
    # gateways post the form themselves, exactly like this.
    resp = _auth_client().post(
        "/v2/oauth2/token/introspect", data={"token": token, **form}, encoding="form"
    )
    return dict(resp.data)


def _groups_of(user: str) -> set[str]:
    dep = _auth_client().oauth2_get_dependent_tokens(mint_token(user))
    groups_token = dep.by_resource_server[GROUPS_RS]["access_token"]
    client = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(groups_token))
    return {group["id"] for group in client.get_my_groups()}


def test_tokens_look_opaque_and_are_minted_offline() -> None:
    token = mint_token("alice")
    assert len(token) > 200
    assert "=" not in token
    assert set(token) <= set(string.ascii_letters + string.digits + "-_.")
    assert mint_token("alice") != token  # a new session each time


@pytest.mark.parametrize("user", sorted(DEV_IDENTITIES))
def test_introspect_each_dev_user(standin: _Server, user: str) -> None:
    ident = DEV_IDENTITIES[user]
    data = _auth_client().oauth2_token_introspect(
        mint_token(user), include="session_info,identity_set_detail"
    )
    assert data["active"] is True
    assert data["username"] == ident.username
    assert data["sub"] == ident.sub
    assert data["scope"] == DEV_GATEWAY_SCOPE
    assert DEV_CLIENT_ID in data["aud"]
    assert data["iss"] == "https://auth.globus.org"
    assert data["iat"] <= time.time() < data["exp"]
    # The gateway ties the session's IdP back to an identity to check its domain.
    session = data["session_info"]
    assert set(session["authentications"]) == {ident.sub}
    session_idp = session["authentications"][ident.sub]["idp"]
    detail = [i for i in data["identity_set_detail"] if i["identity_provider"] == session_idp]
    assert [i["username"] for i in detail] == [ident.username]
    assert detail[0]["identity_provider_display_name"] == ident.idp_name
    assert "identity_set" not in data and "policy_evaluations" not in data


def test_identity_set_only_when_asked(standin: _Server) -> None:
    data = _auth_client().oauth2_token_introspect(mint_token("bob"), include="identity_set")
    assert data["identity_set"] == [DEV_IDENTITIES["bob"].sub]
    assert "session_info" not in data


def test_dev_identities_are_stable() -> None:
    assert {u: i.username for u, i in DEV_IDENTITIES.items()} == {
        "alice": "alice@anl.gov",
        "bob": "bob@uchicago.edu",
        "carol": "carol@example.org",
        "dave": "dave@anl.gov",
    }
    assert DEV_IDENTITIES["alice"].idp_id == DEV_IDENTITIES["dave"].idp_id
    assert DEV_IDENTITIES["alice"].idp_id != DEV_IDENTITIES["carol"].idp_id
    assert ALLOWED_GROUP_ID in DEV_IDENTITIES["carol"].groups
    assert DEV_IDENTITIES["bob"].groups == ()


def test_expired_forged_and_garbage_tokens_are_inactive(standin: _Server) -> None:
    client = _auth_client()
    good = mint_token("alice")
    payload, mac = good.rsplit(".", 1)
    forged_mac = payload + "." + ("A" if mac[0] != "A" else "B") + mac[1:]
    for token in (
        mint_token("alice", expired=True),
        mint_token("alice", secret="someone-elses-secret"),
        forged_mac,
        "firstdev.e30.AAAA",
        "not-a-token",
        "",
    ):
        assert client.oauth2_token_introspect(token).data == {"active": False}


def test_token_secret_comes_from_env_at_call_time(
    standin: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIRST_DEV_TOKEN_SECRET", "rotated")
    token = mint_token("alice")
    assert _auth_client().oauth2_token_introspect(token)["active"] is True
    monkeypatch.delenv("FIRST_DEV_TOKEN_SECRET")
    assert _auth_client().oauth2_token_introspect(token)["active"] is False


def test_wrong_client_secret_is_401(standin: _Server) -> None:
    with pytest.raises(globus_sdk.AuthAPIError) as err:
        _auth_client("wrong").oauth2_token_introspect(mint_token("alice"))
    assert err.value.http_status == 401
    assert err.value.raw_json == {"error": "invalid_client"}
    with pytest.raises(globus_sdk.AuthAPIError) as err:
        _auth_client("wrong").oauth2_get_dependent_tokens(mint_token("alice"))
    assert err.value.http_status == 401


def test_policy_evaluations(standin: _Server) -> None:
    data = _introspect(
        mint_token("alice"),
        authentication_policies=f"{PASSING_POLICY},{FAILING_POLICY}",
        include="session_info",
    )
    assert data["policy_evaluations"] == {
        PASSING_POLICY: {"evaluation": True},
        FAILING_POLICY: {"evaluation": False},
    }
    assert "session_info" in data


def test_dependent_tokens_and_groups(standin: _Server) -> None:
    assert _groups_of("alice") == {ALLOWED_GROUP_ID}
    assert _groups_of("bob") == set()
    assert _groups_of("carol") == {ALLOWED_GROUP_ID}
    assert _groups_of("dave") == {ALLOWED_GROUP_ID, ADMIN_GROUP_ID}


def test_dependent_token_shape(standin: _Server) -> None:
    dep = _auth_client().oauth2_get_dependent_tokens(mint_token("dave"))
    assert isinstance(dep.data, list)
    groups = dep.by_resource_server[GROUPS_RS]
    assert groups["scope"] == (
        "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
    )
    assert groups["expires_at_seconds"] > time.time()
    [raw] = dep.data
    assert raw["token_type"] == "Bearer" and raw["expires_in"] > 0
    memberships = globus_sdk.GroupsClient(
        authorizer=globus_sdk.AccessTokenAuthorizer(groups["access_token"])
    ).get_my_groups()
    for group in memberships:
        [membership] = group["my_memberships"]
        assert membership["identity_id"] == DEV_IDENTITIES["dave"].sub
        assert membership["status"] == "active"


def test_dependent_tokens_refused_for_bad_tokens(standin: _Server) -> None:
    client = _auth_client()
    other_scope = "https://auth.globus.org/scopes/some-other-service/all"
    for token in (
        mint_token("alice", expired=True),
        mint_token("alice", scope=other_scope),
        "garbage",
    ):
        with pytest.raises(globus_sdk.AuthAPIError) as err:
            client.oauth2_get_dependent_tokens(token)
        assert err.value.http_status == 400
        assert err.value.raw_json == {"error": "invalid_grant"}


def test_groups_rejects_non_groups_tokens(standin: _Server) -> None:
    for token in (mint_token("alice"), "garbage"):
        client = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(token))
        with pytest.raises(globus_sdk.GroupsAPIError) as err:
            client.get_my_groups()
        assert err.value.http_status == 401


def test_call_counter(standin: _Server) -> None:
    token = mint_token("alice")
    client = _auth_client()
    client.oauth2_token_introspect(token)
    client.oauth2_token_introspect("garbage")
    _groups_of("alice")
    counts = httpx.get(f"{standin.base}/_standin/calls").json()
    assert counts == {"introspect": 2, "dependent_tokens": 1, "my_groups": 1}


def test_tokens_never_logged(
    standin: _Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    # Another test's uvicorn may have configured its loggers not to propagate to the root,
    # where caplog listens: listen on them directly so the access log is always seen.
    for name in ("uvicorn", "uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "disabled", False)
        monkeypatch.setattr(logger, "level", logging.DEBUG)
        monkeypatch.setattr(logger, "handlers", [*logger.handlers, caplog.handler])
    token = mint_token("alice")
    _introspect(token, include="session_info,identity_set_detail")
    dep = _auth_client().oauth2_get_dependent_tokens(token)
    groups_token = dep.by_resource_server[GROUPS_RS]["access_token"]
    globus_sdk.GroupsClient(
        authorizer=globus_sdk.AccessTokenAuthorizer(groups_token)
    ).get_my_groups()
    ours = [r for r in caplog.records if not r.name.startswith(("globus_sdk", "urllib3"))]
    assert any(r.name.startswith("uvicorn") for r in ours)
    logged = "\n".join(r.getMessage() for r in ours)
    assert token not in logged and groups_token not in logged


# -- client credentials: the gateway's Globus Compute client and service accounts ---------------
def test_client_credentials_give_one_compute_token_however_often_the_scope_is_asked(
    standin: _Server,
) -> None:
    """globus-sdk asks for the Compute scope once per attached client; Globus gives one token,
    for the resource server `funcx_service`, which is what its ClientApp requires."""
    grant = _auth_client().oauth2_client_credentials_tokens(
        requested_scopes=[COMPUTE_SCOPE, COMPUTE_SCOPE, COMPUTE_SCOPE]
    )

    assert set(grant.by_resource_server) == {"funcx_service"}
    token = grant.by_resource_server["funcx_service"]
    assert token["scope"] == COMPUTE_SCOPE
    assert grant.data["other_tokens"] == []
    assert standin.app.state.calls["client_credentials"] == 1


def test_client_credentials_need_the_clients_secret(standin: _Server) -> None:
    with pytest.raises(globus_sdk.AuthAPIError) as refused:
        _auth_client("wrong-secret").oauth2_client_credentials_tokens(
            requested_scopes=COMPUTE_SCOPE
        )
    assert refused.value.http_status == 401


def _pipeline_token() -> str:
    pipeline = globus_sdk.ConfidentialAppAuthClient(
        DEV_SERVICE_CLIENT_ID, DEV_SERVICE_CLIENT_SECRET
    )
    grant = pipeline.oauth2_client_credentials_tokens(requested_scopes=DEV_GATEWAY_SCOPE)
    return str(grant.by_resource_server[DEV_CLIENT_ID]["access_token"])


def test_a_client_identitys_token_introspects_as_the_client_itself(standin: _Server) -> None:
    data = _introspect(_pipeline_token(), include="session_info,identity_set_detail")

    assert data["active"] is True
    assert data["sub"] == DEV_SERVICE_CLIENT_ID == data["client_id"]
    assert data["username"] == f"{DEV_SERVICE_CLIENT_ID}@clients.auth.globus.org"
    assert data["scope"] == DEV_GATEWAY_SCOPE
    # No person signed in: no identity provider session.
    assert data["session_info"]["authentications"] == {}
    assert [i["username"] for i in data["identity_set_detail"]] == [data["username"]]


def test_the_service_account_is_in_the_allowed_group(standin: _Server) -> None:
    dep = _auth_client().oauth2_get_dependent_tokens(_pipeline_token())
    groups_token = dep.by_resource_server[GROUPS_RS]["access_token"]
    client = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(groups_token))
    assert {group["id"] for group in client.get_my_groups()} == {ALLOWED_GROUP_ID}


def test_the_gateway_serves_the_listed_service_account(
    standin: _Server, aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from first_core.auth import Authenticator
    from first_core.settings import get_settings

    settings = get_settings()
    monkeypatch.setattr(settings, "globus_client_id", DEV_CLIENT_ID)
    monkeypatch.setattr(settings, "globus_client_secret", SecretStr(DEV_CLIENT_SECRET))
    monkeypatch.setattr(settings, "gateway_scope", DEV_GATEWAY_SCOPE)
    monkeypatch.setattr(settings, "allowed_domains", ["anl.gov"])
    monkeypatch.setattr(settings, "allowed_groups", [ALLOWED_GROUP_ID])
    monkeypatch.setattr(settings, "service_accounts", [DEV_SERVICE_CLIENT_ID])
    authenticator = Authenticator()

    caller = authenticator.authenticate(f"Bearer {_pipeline_token()}")
    authenticator.authorize(caller)

    assert caller.is_service_account and caller.user_id == DEV_SERVICE_CLIENT_ID
    assert ALLOWED_GROUP_ID in caller.groups


def test_the_hang_switch_holds_globus_calls_until_turned_off(
    standin: _Server, aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`POST /_standin/hang?seconds=S`: a Globus that hangs, which the gateway answers with a
    quick 503 (its read timeout) rather than waiting."""
    from first_core.auth import Authenticator
    from first_core.errors import ServiceUnavailableError
    from first_core.settings import get_settings

    settings = get_settings()
    monkeypatch.setattr(settings, "globus_client_id", DEV_CLIENT_ID)
    monkeypatch.setattr(settings, "globus_client_secret", SecretStr(DEV_CLIENT_SECRET))
    monkeypatch.setattr(settings, "gateway_scope", DEV_GATEWAY_SCOPE)
    monkeypatch.setattr(settings, "allowed_domains", ["anl.gov", "uchicago.edu"])
    monkeypatch.setattr(settings, "globus_read_timeout_seconds", 0.5)
    assert httpx.post(f"{standin.base}/_standin/hang?seconds=30").json() == {"hang_seconds": 30}
    try:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError):
            Authenticator().authenticate(f"Bearer {mint_token('alice')}")
        assert time.monotonic() - started < 3
        assert httpx.get(f"{standin.base}/_standin/calls").json()["introspect"] == 1
    finally:
        httpx.post(f"{standin.base}/_standin/hang?seconds=0")

    assert httpx.get(f"{standin.base}/_standin/hang").json() == {"hang_seconds": 0}
    assert Authenticator().authenticate(f"Bearer {mint_token('alice')}").username
    assert httpx.post(f"{standin.base}/_standin/hang?seconds=x").status_code == 400
