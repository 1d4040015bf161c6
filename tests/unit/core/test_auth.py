"""Authentication against a faked Globus Auth and Groups (`globus_sdk.testing` + `responses`).

Every test builds a fresh `Authenticator` (a cold instance) and a fresh moto backend, so the
memory cache and the `token_cache` table start empty unless a test fills them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import types
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import boto3
import pytest
import requests
import responses
from globus_sdk.testing import RegisteredResponse, get_last_request, load_response
from pydantic import SecretStr

import first_core.auth
from first_core.auth import Authenticator, Caller, token_hash
from first_core.errors import (
    AuthenticationError,
    GatewayError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
)
from first_core.ratelimit import used
from first_core.settings import get_settings
from first_core.tables import TokenCacheEntry

CLIENT_ID = "0c1a2b3c-0000-4000-8000-00000000c11e"
CLIENT_SECRET = "gateway-client-secret"
SCOPE = f"https://auth.globus.org/scopes/{CLIENT_ID}/action_all"
ALLOWED_GROUP = "9a1e0000-0000-4000-8000-000000000001"
OTHER_GROUP = "9a1e0000-0000-4000-8000-000000000002"
ALLOWED_DOMAINS = ["anl.gov", "uchicago.edu"]
POLICY_A = "11111111-2222-3333-4444-555555555555"
POLICY_B = "66666666-7777-8888-9999-000000000000"

TOKEN = "AgXyz-user-access-token-0123456789"
GROUPS_TOKEN = "groupsToken-for-the-gateway"

ALICE_ANL = "a11ce000-0000-4000-8000-000000000001"  # primary identity
ALICE_GMAIL = "a11ce000-0000-4000-8000-000000000002"  # linked identity

INTROSPECT_URL = "https://auth.globus.org/v2/oauth2/token/introspect"
TOKEN_URL = "https://auth.globus.org/v2/oauth2/token"
MY_GROUPS_URL = "https://groups.api.globus.org/v2/groups/my_groups"


# -- fakes ------------------------------------------------------------------------------------
def identity(sub: str, username: str, name: str = "Alice Liddell") -> dict[str, Any]:
    domain = username.rpartition("@")[2]
    return {
        "sub": sub,
        "username": username,
        "name": name,
        "email": username,
        "identity_provider": f"idp-{domain}",
        "identity_provider_display_name": f"{domain} login",
        "organization": domain,
        "status": "used",
    }


ALICE_IDENTITIES = [
    identity(ALICE_ANL, "alice@anl.gov"),
    identity(ALICE_GMAIL, "alice@gmail.com"),
]


def introspection(
    *,
    active: bool = True,
    exp: float | None = None,
    scope: str = SCOPE,
    sub: str = ALICE_ANL,
    username: str = "alice@anl.gov",
    session: tuple[str, ...] = (ALICE_ANL,),
    identities: list[dict[str, Any]] | None = None,
    policy_evaluations: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An introspection answer shaped like Globus Auth's (session_info, identity_set_detail)."""
    if not active:
        return {"active": False}
    now = int(time.time())
    body: dict[str, Any] = {
        "active": True,
        "scope": f"openid {scope}",
        "client_id": "native-client-of-the-user",
        "sub": sub,
        "username": username,
        "name": "Alice Liddell",
        "email": username,
        "aud": [CLIENT_ID],
        "iss": "https://auth.globus.org",
        "iat": now - 60,
        "nbf": now - 60,
        "exp": int(exp if exp is not None else now + 3600),
        "identity_set_detail": identities if identities is not None else ALICE_IDENTITIES,
        "session_info": {
            "session_id": "5e55104e-0000-4000-8000-000000000000",
            "authentications": {
                sub_id: {"idp": "idp", "auth_time": now - 120, "amr": None, "acr": None}
                for sub_id in session
            },
        },
    }
    if policy_evaluations is not None:
        body["policy_evaluations"] = policy_evaluations
    return body


@pytest.fixture
def globus(aws: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[responses.RequestsMock]:
    """Gateway settings for the test, and a `responses` mock standing in for Globus.

    Depends on `aws` so moto's own `requests` patch is underneath this one.
    """
    s = get_settings()
    monkeypatch.setattr(s, "globus_client_id", CLIENT_ID)
    monkeypatch.setattr(s, "globus_client_secret", SecretStr(CLIENT_SECRET))
    monkeypatch.setattr(s, "gateway_scope", SCOPE)
    monkeypatch.setattr(s, "allowed_domains", list(ALLOWED_DOMAINS))
    monkeypatch.setattr(s, "allowed_groups", [ALLOWED_GROUP])
    monkeypatch.setattr(s, "authentication_policies", [])
    monkeypatch.setattr(s, "clock_skew_seconds", 5)
    monkeypatch.setattr(s, "token_cache_seconds", 600)
    monkeypatch.setattr(s, "groups_cache_seconds", 300)
    monkeypatch.setattr(s, "domain_groups", {})
    monkeypatch.setattr(s, "service_accounts", [])
    monkeypatch.setattr(s, "globus_retries", 0)  # globus-sdk would sleep between retries
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def fake_globus(
    mock: responses.RequestsMock,
    answer: dict[str, Any],
    groups: tuple[str, ...] = (ALLOWED_GROUP,),
) -> None:
    load_response(
        RegisteredResponse(
            service="auth", path="/v2/oauth2/token/introspect", method="POST", json=answer
        ),
        requests_mock=mock,
    )
    load_response(
        RegisteredResponse(
            service="auth",
            path="/v2/oauth2/token",
            method="POST",
            json=[
                {
                    "scope": "urn:globus:auth:scope:groups.api.globus.org:"
                    "view_my_groups_and_memberships",
                    "access_token": GROUPS_TOKEN,
                    "token_type": "bearer",
                    "expires_in": 172800,
                    "resource_server": "groups.api.globus.org",
                }
            ],
        ),
        requests_mock=mock,
    )
    load_response(
        RegisteredResponse(
            service="groups",
            path="/v2/groups/my_groups",
            json=[
                {"id": gid, "name": f"group {gid}", "group_type": "regular", "my_memberships": []}
                for gid in groups
            ],
        ),
        requests_mock=mock,
    )


def calls_to(mock: responses.RequestsMock, url: str) -> list[Any]:
    return [call for call in mock.calls if call.request.url.split("?")[0] == url]


def form(call: Any) -> dict[str, list[str]]:
    body = call.request.body
    return parse_qs(body.decode() if isinstance(body, bytes) else body)


def bearer(token: str = TOKEN) -> str:
    return f"Bearer {token}"


# -- accepted tokens --------------------------------------------------------------------------
def test_active_token_in_allowed_domain_and_group_gives_the_caller(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    answer = introspection()
    fake_globus(globus, answer, groups=(ALLOWED_GROUP, OTHER_GROUP))

    caller = authenticator.authenticate(bearer())

    assert caller.user_id == ALICE_ANL
    assert caller.username == "alice@anl.gov"
    assert caller.name == "Alice Liddell"
    assert caller.email == "alice@anl.gov"
    assert caller.idp_domain == "anl.gov"
    assert caller.idp_name == "anl.gov login"
    assert caller.groups == frozenset({ALLOWED_GROUP, OTHER_GROUP})
    assert caller.token_expires_at == answer["exp"]
    assert caller.groups_checked_at == pytest.approx(time.time(), abs=30)
    authenticator.authorize(caller)  # in an allowed group: no exception


def test_introspection_asks_for_session_info_and_identity_set_detail(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection())

    authenticator.authenticate(bearer())

    [call] = calls_to(globus, INTROSPECT_URL)
    sent = form(call)
    assert sent["token"] == [TOKEN]
    assert sent["include"] == ["session_info,identity_set_detail"]
    assert "authentication_policies" not in sent
    # The gateway introspects as itself, a confidential client.
    expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert call.request.headers["Authorization"] == f"Basic {expected}"


def test_groups_are_read_with_the_dependent_groups_token(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection())

    authenticator.authenticate(bearer())

    [dependent] = calls_to(globus, TOKEN_URL)
    assert form(dependent)["token"] == [TOKEN]
    assert form(dependent)["grant_type"] == ["urn:globus:auth:grant_type:dependent_token"]
    last = get_last_request(requests_mock=globus)
    assert last is not None
    assert last.url.split("?")[0] == MY_GROUPS_URL
    assert last.headers["Authorization"] == f"Bearer {GROUPS_TOKEN}"


def test_token_expired_within_the_clock_skew_is_accepted(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection(exp=time.time() - 2))  # skew is 5 s

    caller = authenticator.authenticate(bearer())

    assert caller.user_id == ALICE_ANL


# -- refused tokens ---------------------------------------------------------------------------
def test_inactive_token_is_refused_with_401(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection(active=False))

    with pytest.raises(AuthenticationError) as refused:
        authenticator.authenticate(bearer())

    assert refused.value.status == 401
    assert "inactive" in refused.value.message
    assert calls_to(globus, TOKEN_URL) == []  # groups never looked up for a dead token


def test_token_expired_beyond_the_clock_skew_is_refused(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection(exp=time.time() - 60))

    with pytest.raises(AuthenticationError) as refused:
        authenticator.authenticate(bearer())

    assert refused.value.status == 401
    assert "expired" in refused.value.message


def test_token_without_the_gateway_scope_is_refused(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    other_scope = "https://auth.globus.org/scopes/some-other-service/action_all"
    fake_globus(globus, introspection(scope=other_scope))

    with pytest.raises(AuthenticationError) as refused:
        authenticator.authenticate(bearer())

    assert refused.value.status == 401
    assert "scope" in refused.value.message


MALLORY = "3a110000-0000-4000-8000-000000000009"


def mallory_introspection() -> dict[str, Any]:
    """A person signed in through a provider (example.org) the gateway does not allow."""
    return introspection(
        sub=MALLORY,
        username="mallory@example.org",
        session=(MALLORY,),
        identities=[identity(MALLORY, "mallory@example.org")],
    )


def test_identity_provider_outside_allowed_domains_is_refused_listing_them(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(
        globus,
        mallory_introspection(),
    )

    with pytest.raises(AuthenticationError) as refused:
        authenticator.authenticate(bearer())

    assert refused.value.status == 401
    assert "example.org" in refused.value.message
    assert "anl.gov, uchicago.edu" in refused.value.message


def test_allowed_primary_identity_signed_in_with_disallowed_linked_identity_is_refused(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    # Primary identity alice@anl.gov is allowed, but this session authenticated alice@gmail.com.
    fake_globus(globus, introspection(sub=ALICE_ANL, session=(ALICE_GMAIL,)))

    with pytest.raises(AuthenticationError) as refused:
        authenticator.authenticate(bearer())

    assert refused.value.status == 401
    assert "gmail.com" in refused.value.message


def test_disallowed_primary_identity_signed_in_with_allowed_linked_identity_is_accepted(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    # Primary identity alice@gmail.com; this session authenticated the linked alice@anl.gov.
    fake_globus(
        globus,
        introspection(sub=ALICE_GMAIL, username="alice@gmail.com", session=(ALICE_ANL,)),
    )

    caller = authenticator.authenticate(bearer())

    assert caller.user_id == ALICE_GMAIL  # the owner key stays the account's `sub`
    assert caller.username == "alice@anl.gov"
    assert caller.idp_domain == "anl.gov"


def test_failing_policy_evaluation_is_refused_asking_to_log_in_again(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "authentication_policies", [POLICY_A, POLICY_B])
    fake_globus(
        globus,
        introspection(
            policy_evaluations={POLICY_A: {"evaluation": True}, POLICY_B: {"evaluation": False}}
        ),
    )

    with pytest.raises(AuthenticationError) as refused:
        authenticator.authenticate(bearer())

    assert refused.value.status == 401
    assert POLICY_B in refused.value.message
    assert "Log out of Globus and log in again" in refused.value.message
    [call] = calls_to(globus, INTROSPECT_URL)
    sent = form(call)
    assert sent["authentication_policies"] == [f"{POLICY_A},{POLICY_B}"]
    assert sent["include"] == ["session_info,identity_set_detail"]
    assert sent["token"] == [TOKEN]


def test_passing_policy_evaluations_are_accepted(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "authentication_policies", [POLICY_A])
    fake_globus(globus, introspection(policy_evaluations={POLICY_A: {"evaluation": True}}))

    assert authenticator.authenticate(bearer()).user_id == ALICE_ANL


def test_globus_auth_outage_is_a_503_asking_to_retry_and_is_not_cached(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    load_response(
        RegisteredResponse(
            service="auth",
            path="/v2/oauth2/token/introspect",
            method="POST",
            status=500,
            json={"errors": [{"status": "500", "code": "Error"}]},
        ),
        requests_mock=globus,
    )

    with pytest.raises(ServiceUnavailableError) as unavailable:
        authenticator.authenticate(bearer())

    assert unavailable.value.status == 503
    assert "HTTP 500" in unavailable.value.message
    assert "retry" in unavailable.value.message
    assert "not a problem with your token" in unavailable.value.message
    assert unavailable.value.headers["Retry-After"] == "5"
    # Globus is back: the next request is answered at once, not from a cached refusal.
    fake_globus(globus, introspection())
    globus.replace(responses.POST, INTROSPECT_URL, json=introspection())
    assert authenticator.authenticate(bearer()).user_id == ALICE_ANL
    assert len(calls_to(globus, INTROSPECT_URL)) == 2
    assert TokenCacheEntry.count(token_hash(TOKEN)) == 1  # only the good verdict


def test_globus_outage_is_retried_globus_retries_times(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "globus_retries", 1)
    globus.add(responses.POST, INTROSPECT_URL, status=503, json={"errors": []})

    with pytest.raises(ServiceUnavailableError):
        Authenticator().authenticate(bearer())

    assert len(calls_to(globus, INTROSPECT_URL)) == 2  # the call and one retry, then 503


def test_globus_auth_unreachable_is_a_503(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    globus.add(responses.POST, INTROSPECT_URL, body=requests.ConnectionError("refused"))

    with pytest.raises(ServiceUnavailableError) as unavailable:
        authenticator.authenticate(bearer())

    assert "no answer" in unavailable.value.message


def test_globus_refusing_the_gateways_own_credentials_is_a_500_for_the_operator(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    globus.add(responses.POST, INTROSPECT_URL, status=401, json={"error": "invalid_client"})

    with pytest.raises(GatewayError) as failed:
        authenticator.authenticate(bearer())

    assert failed.value.status == 500
    assert "operator" in failed.value.message


@pytest.mark.parametrize("url", [TOKEN_URL, MY_GROUPS_URL])
def test_globus_groups_outage_is_a_503_and_is_not_cached(
    globus: responses.RequestsMock, authenticator: Authenticator, url: str
) -> None:
    fake_globus(globus, introspection())
    method = responses.POST if url == TOKEN_URL else responses.GET
    globus.replace(method, url, status=502, json={"errors": []})

    with pytest.raises(ServiceUnavailableError) as unavailable:
        authenticator.authenticate(bearer())

    assert "retry" in unavailable.value.message
    assert TokenCacheEntry.count() == 0
    fake_globus(globus, introspection())
    globus.replace(
        method,
        url,
        **(
            {"json": [{"id": ALLOWED_GROUP, "name": "g"}]}
            if url == MY_GROUPS_URL
            else {
                "json": [
                    {
                        "access_token": GROUPS_TOKEN,
                        "resource_server": "groups.api.globus.org",
                        "scope": "x",
                        "token_type": "bearer",
                        "expires_in": 10,
                    }
                ]
            }
        ),
    )
    assert authenticator.authenticate(bearer()).groups == {ALLOWED_GROUP}


def test_groups_token_refused_by_groups_is_a_401_asking_to_log_in_again(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection())
    globus.replace(responses.GET, MY_GROUPS_URL, status=401, json={"code": "UNAUTHORIZED"})

    with pytest.raises(AuthenticationError) as refused:
        authenticator.authenticate(bearer())

    assert "first-auth login" in refused.value.message


def test_missing_groups_dependent_token_is_a_401(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection())
    globus.replace(responses.POST, TOKEN_URL, json=[])  # no groups token among them

    with pytest.raises(AuthenticationError) as refused:
        authenticator.authenticate(bearer())

    assert "group memberships" in refused.value.message


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "Bearer",
        "Bearer ",
        "Bearer     ",
        "Bearer " + "x" * 4097,
    ],
    ids=["none", "empty", "basic", "other-scheme", "bare", "bare-space", "blank", "too-long"],
)
def test_missing_or_malformed_authorization_header_is_a_401_without_calling_globus(
    globus: responses.RequestsMock, authenticator: Authenticator, authorization: str | None
) -> None:
    with pytest.raises(AuthenticationError) as refused:
        authenticator.authenticate(authorization)

    assert refused.value.status == 401
    assert len(globus.calls) == 0


def test_bearer_scheme_is_case_insensitive(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection())

    caller = authenticator.authenticate(f"bearer   {TOKEN}  ")

    assert caller.user_id == ALICE_ANL
    assert form(calls_to(globus, INTROSPECT_URL)[0])["token"] == [TOKEN]


# -- the global gate --------------------------------------------------------------------------
def test_caller_outside_allowed_groups_is_forbidden_with_403(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection(), groups=(OTHER_GROUP,))
    caller = authenticator.authenticate(bearer())  # authenticated ...

    with pytest.raises(PermissionDeniedError) as forbidden:
        authenticator.authorize(caller)  # ... but not allowed in

    assert forbidden.value.status == 403
    assert "alice@anl.gov" in forbidden.value.message


def test_no_allowed_groups_configured_lets_everyone_through(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "allowed_groups", [])
    caller = Caller("u", "u@anl.gov", "U", "u@anl.gov", "anl.gov", "ANL", frozenset())

    authenticator.authorize(caller)


# -- caching ----------------------------------------------------------------------------------
def test_second_authenticate_with_same_token_makes_no_http_call(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection())
    first = authenticator.authenticate(bearer())
    calls = len(globus.calls)
    assert calls == 3  # introspect, dependent tokens, my_groups

    second = authenticator.authenticate(bearer())

    assert len(globus.calls) == calls
    assert second == first


def test_cold_instance_uses_the_token_cache_table_without_http(
    globus: responses.RequestsMock,
) -> None:
    fake_globus(globus, introspection(), groups=(ALLOWED_GROUP, OTHER_GROUP))
    warm = Authenticator().authenticate(bearer())
    calls = len(globus.calls)

    cold = Authenticator().authenticate(bearer())

    assert len(globus.calls) == calls
    assert cold == warm
    assert cold.groups == frozenset({ALLOWED_GROUP, OTHER_GROUP})


def test_token_cache_is_keyed_by_sha256_and_never_stores_the_token(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection())
    authenticator.authenticate(bearer())

    raw = boto3.client("dynamodb", region_name=get_settings().aws_region).scan(
        TableName=TokenCacheEntry.Meta.table_name
    )["Items"]

    # One verdict (by token hash) and one group list (by user id): the token appears in neither.
    assert sorted(item["token_hash"]["S"] for item in raw) == sorted(
        [hashlib.sha256(TOKEN.encode()).hexdigest(), f"groups#{ALICE_ANL}"]
    )
    expected_key = hashlib.sha256(TOKEN.encode()).hexdigest()
    assert token_hash(TOKEN) == expected_key
    assert TOKEN not in json.dumps(raw)
    assert GROUPS_TOKEN not in json.dumps(raw)
    assert TokenCacheEntry.get(expected_key).verdict["user_id"] == ALICE_ANL


def test_token_cache_entry_expires_no_later_than_the_token(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    exp = int(time.time()) + 60  # well inside token_cache_seconds (600)
    fake_globus(globus, introspection(exp=exp))
    authenticator.authenticate(bearer())

    entry = TokenCacheEntry.get(token_hash(TOKEN))

    assert time.time() < entry.expires_at.timestamp() <= exp


def test_token_cache_entry_expires_after_token_cache_seconds_for_long_tokens(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection(exp=time.time() + 48 * 3600))
    before = time.time()
    authenticator.authenticate(bearer())

    entry = TokenCacheEntry.get(token_hash(TOKEN))

    assert entry.expires_at.timestamp() == pytest.approx(before + 600, abs=5)


def test_expired_cache_entry_is_not_trusted_by_a_cold_instance(
    globus: responses.RequestsMock,
) -> None:
    fake_globus(globus, introspection())
    TokenCacheEntry(
        token_hash(TOKEN),
        verdict={
            "user_id": "stale",
            "username": "stale@anl.gov",
            "name": "",
            "email": "",
            "idp_domain": "anl.gov",
            "idp_name": "",
            "groups": [],
            "token_expires_at": time.time() - 10,
            "groups_checked_at": time.time(),
        },
        expires_at=first_core.auth._utc(time.time() - 10),
    ).save()

    caller = Authenticator().authenticate(bearer())

    assert caller.user_id == ALICE_ANL
    assert len(calls_to(globus, INTROSPECT_URL)) == 1


def test_refused_token_is_remembered_briefly(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_globus(globus, introspection(active=False))
    with pytest.raises(AuthenticationError):
        authenticator.authenticate(bearer())
    assert len(globus.calls) == 1

    with pytest.raises(AuthenticationError):
        authenticator.authenticate(bearer())
    assert len(globus.calls) == 1  # the refusal came from memory

    later = time.time() + 11  # past the 10 s refusal cache
    monkeypatch.setattr(first_core.auth, "time", types.SimpleNamespace(time=lambda: later))
    with pytest.raises(AuthenticationError):
        authenticator.authenticate(bearer())
    assert len(globus.calls) == 2  # asked Globus again
    assert TokenCacheEntry.count() == 0  # refusals are never written to the table


def test_groups_are_looked_up_again_after_groups_cache_seconds(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_globus(globus, introspection(), groups=(ALLOWED_GROUP,))
    assert authenticator.authenticate(bearer()).groups == {ALLOWED_GROUP}
    globus.replace(responses.GET, MY_GROUPS_URL, json=[{"id": OTHER_GROUP, "name": "other"}])

    later = time.time() + 301  # past groups_cache_seconds, before token_cache_seconds
    monkeypatch.setattr(first_core.auth, "time", types.SimpleNamespace(time=lambda: later))
    caller = authenticator.authenticate(bearer())

    assert caller.groups == {OTHER_GROUP}
    assert len(calls_to(globus, INTROSPECT_URL)) == 1  # no second introspection
    assert len(calls_to(globus, MY_GROUPS_URL)) == 2
    with pytest.raises(PermissionDeniedError):
        authenticator.authorize(caller)


# -- groups cached per user -------------------------------------------------------------------
OTHER_TOKEN = "AgXyz-a-second-token-of-the-same-user-9876"


def test_a_new_token_of_the_same_user_does_not_call_groups_again(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection())
    first = authenticator.authenticate(bearer(TOKEN))
    assert len(calls_to(globus, MY_GROUPS_URL)) == 1

    second = authenticator.authenticate(bearer(OTHER_TOKEN))

    assert len(calls_to(globus, INTROSPECT_URL)) == 2  # each token is introspected once ...
    assert len(calls_to(globus, TOKEN_URL)) == 1  # ... but no new dependent token
    assert len(calls_to(globus, MY_GROUPS_URL)) == 1  # ... and no new Groups call
    assert second.groups == first.groups == {ALLOWED_GROUP}
    assert second.groups_checked_at == first.groups_checked_at


def test_a_cold_instance_reads_the_users_groups_from_the_table(
    globus: responses.RequestsMock,
) -> None:
    fake_globus(globus, introspection(), groups=(ALLOWED_GROUP, OTHER_GROUP))
    Authenticator().authenticate(bearer(TOKEN))
    groups_calls = len(calls_to(globus, MY_GROUPS_URL)) + len(calls_to(globus, TOKEN_URL))

    cold = Authenticator().authenticate(bearer(OTHER_TOKEN))  # new instance, new token

    assert cold.groups == {ALLOWED_GROUP, OTHER_GROUP}
    assert len(calls_to(globus, MY_GROUPS_URL)) + len(calls_to(globus, TOKEN_URL)) == groups_calls
    assert len(calls_to(globus, INTROSPECT_URL)) == 2


def test_the_users_groups_entry_has_no_token_and_expires_after_groups_cache_seconds(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection())
    before = time.time()
    authenticator.authenticate(bearer())

    entry = TokenCacheEntry.get(f"groups#{ALICE_ANL}")

    assert entry.verdict["groups"] == [ALLOWED_GROUP]
    assert entry.verdict["user_id"] == ALICE_ANL
    assert entry.expires_at.timestamp() == pytest.approx(before + 300, abs=5)
    assert TOKEN not in json.dumps(entry.verdict)


def test_stale_users_groups_in_the_table_are_not_trusted(
    globus: responses.RequestsMock,
) -> None:
    fake_globus(globus, introspection(), groups=(ALLOWED_GROUP,))
    old = time.time() - 301
    TokenCacheEntry(
        f"groups#{ALICE_ANL}",
        verdict={"user_id": ALICE_ANL, "groups": [OTHER_GROUP], "checked_at": old},
        # moto keeps expired items; and a live TTL must not outvote checked_at either
        expires_at=first_core.auth._utc(time.time() + 60),
    ).save()

    caller = Authenticator().authenticate(bearer())

    assert caller.groups == {ALLOWED_GROUP}
    assert len(calls_to(globus, MY_GROUPS_URL)) == 1


def test_groups_of_one_user_are_never_given_to_another(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection(), groups=(ALLOWED_GROUP,))
    authenticator.authenticate(bearer(TOKEN))
    bob = "b0b00000-0000-4000-8000-000000000001"
    globus.replace(
        responses.POST,
        INTROSPECT_URL,
        json=introspection(
            sub=bob,
            username="bob@uchicago.edu",
            session=(bob,),
            identities=[identity(bob, "bob@uchicago.edu", "Bob")],
        ),
    )
    globus.replace(responses.GET, MY_GROUPS_URL, json=[])

    caller = authenticator.authenticate(bearer(OTHER_TOKEN))

    assert caller.user_id == bob
    assert caller.groups == frozenset()
    assert len(calls_to(globus, MY_GROUPS_URL)) == 2


def test_refreshing_groups_does_not_extend_the_verdicts_life(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revoked token must stop working token_cache_seconds after its introspection, however
    often its groups were refreshed in between."""
    fake_globus(globus, introspection(exp=time.time() + 48 * 3600))
    introspected = time.time()
    authenticator.authenticate(bearer())
    first_expiry = TokenCacheEntry.get(token_hash(TOKEN)).expires_at.timestamp()
    assert first_expiry == pytest.approx(introspected + 600, abs=5)

    later = introspected + 301  # groups stale, verdict not
    monkeypatch.setattr(first_core.auth, "time", types.SimpleNamespace(time=lambda: later))
    authenticator.authenticate(bearer())
    assert len(calls_to(globus, MY_GROUPS_URL)) == 2
    assert TokenCacheEntry.get(token_hash(TOKEN)).expires_at.timestamp() == first_expiry

    # Now the token is revoked; past the verdict's expiry Globus is asked again and says so.
    globus.replace(responses.POST, INTROSPECT_URL, json={"active": False})
    after = first_expiry + 1
    monkeypatch.setattr(first_core.auth, "time", types.SimpleNamespace(time=lambda: after))
    with pytest.raises(AuthenticationError):
        authenticator.authenticate(bearer())
    with pytest.raises(AuthenticationError):
        Authenticator().authenticate(bearer())  # a cold instance does not trust the table


def test_memory_and_table_entries_expire_at_the_same_instant(
    globus: responses.RequestsMock, authenticator: Authenticator
) -> None:
    fake_globus(globus, introspection(exp=time.time() + 120))
    caller = authenticator.authenticate(bearer())

    until = authenticator._verdicts.until(token_hash(TOKEN))

    assert until == caller.verdict_expires_at == caller.token_expires_at
    assert TokenCacheEntry.get(token_hash(TOKEN)).expires_at.timestamp() == pytest.approx(until)


# -- allowed groups per identity-provider domain ----------------------------------------------
def test_user_of_a_domain_outside_its_groups_is_forbidden_naming_them(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "domain_groups", {"ANL.gov": [OTHER_GROUP]})
    fake_globus(globus, introspection(), groups=(ALLOWED_GROUP,))
    caller = authenticator.authenticate(bearer())

    with pytest.raises(PermissionDeniedError) as forbidden:
        authenticator.authorize(caller)

    assert forbidden.value.status == 403
    assert "anl.gov" in forbidden.value.message
    assert OTHER_GROUP in forbidden.value.message


def test_user_of_a_domain_in_one_of_its_groups_is_let_in(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "domain_groups", {"anl.gov": [OTHER_GROUP, "x"]})
    fake_globus(globus, introspection(), groups=(ALLOWED_GROUP, OTHER_GROUP))

    authenticator.authorize(authenticator.authenticate(bearer()))


def test_domain_groups_of_another_domain_do_not_apply(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "domain_groups", {"uchicago.edu": [OTHER_GROUP]})
    fake_globus(globus, introspection(), groups=(ALLOWED_GROUP,))

    authenticator.authorize(authenticator.authenticate(bearer()))


def test_domain_groups_come_from_the_environment_as_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from first_core.settings import Settings

    monkeypatch.setenv("FIRST_DOMAIN_GROUPS", json.dumps({"uchicago.edu": [OTHER_GROUP]}))
    monkeypatch.setenv("FIRST_SERVICE_ACCOUNTS", json.dumps(["c1"]))

    settings = Settings()

    assert settings.domain_groups == {"uchicago.edu": [OTHER_GROUP]}
    assert settings.service_accounts == ["c1"]


# -- service accounts -------------------------------------------------------------------------
SERVICE_CLIENT = "5e7v1ce0-0000-4000-8000-00000000c0de"


def client_identity_introspection(client_id: str = SERVICE_CLIENT) -> dict[str, Any]:
    """What Globus Auth says of a client-credentials token: the client is its own identity."""
    username = f"{client_id}@clients.auth.globus.org"
    answer = introspection(
        sub=client_id,
        username=username,
        session=(),
        identities=[
            {
                "sub": client_id,
                "username": username,
                "name": "nightly pipeline",
                "email": None,
                "identity_provider": "client-idp",
                "status": "used",
            }
        ],
    )
    answer["client_id"] = client_id
    answer["session_info"] = {"session_id": None, "authentications": {}}
    return answer


def test_listed_service_account_skips_the_identity_provider_check(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "service_accounts", [SERVICE_CLIENT])
    fake_globus(globus, client_identity_introspection())

    caller = authenticator.authenticate(bearer())

    assert caller.is_service_account
    assert caller.user_id == SERVICE_CLIENT
    assert caller.idp_domain == "clients.auth.globus.org"
    authenticator.authorize(caller)  # still needs the allowed group, which it has


def test_service_account_still_needs_the_allowed_groups(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "service_accounts", [SERVICE_CLIENT])
    fake_globus(globus, client_identity_introspection(), groups=())

    with pytest.raises(PermissionDeniedError):
        authenticator.authorize(authenticator.authenticate(bearer()))


def test_unlisted_client_identity_is_refused_saying_how_to_register_it(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "service_accounts", ["some-other-client"])
    fake_globus(globus, client_identity_introspection())

    with pytest.raises(AuthenticationError) as refused:
        authenticator.authenticate(bearer())

    assert refused.value.status == 401
    assert SERVICE_CLIENT in refused.value.message
    assert "FIRST_SERVICE_ACCOUNTS" in refused.value.message


def test_a_person_whose_id_is_listed_is_still_checked_for_the_provider(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a client identity can be a service account: listing a person's id skips nothing."""
    monkeypatch.setattr(get_settings(), "service_accounts", [MALLORY])
    fake_globus(
        globus,
        mallory_introspection(),
    )

    with pytest.raises(AuthenticationError) as refused:
        authenticator.authenticate(bearer())

    assert "example.org" in refused.value.message


def test_a_users_token_issued_through_a_listed_client_is_not_a_service_account(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token's `client_id` is the app that obtained it; only the identity (`sub`) counts."""
    monkeypatch.setattr(get_settings(), "service_accounts", ["native-client-of-the-user"])
    fake_globus(globus, introspection(session=(ALICE_GMAIL,)))

    with pytest.raises(AuthenticationError) as refused:
        authenticator.authenticate(bearer())

    assert "gmail.com" in refused.value.message


def test_cached_verdicts_without_the_new_fields_are_still_read(
    globus: responses.RequestsMock,
) -> None:
    fake_globus(globus, introspection())
    until = time.time() + 60
    TokenCacheEntry(
        token_hash(TOKEN),
        verdict={
            "user_id": ALICE_ANL,
            "username": "alice@anl.gov",
            "name": "",
            "email": "",
            "idp_domain": "anl.gov",
            "idp_name": "",
            "groups": [ALLOWED_GROUP],
            "token_expires_at": until,
            "groups_checked_at": time.time(),
        },
        expires_at=first_core.auth._utc(until),
    ).save()

    caller = Authenticator().authenticate(bearer())

    assert caller.user_id == ALICE_ANL
    assert caller.verdict_expires_at == pytest.approx(until)
    assert not caller.is_service_account
    assert len(globus.calls) == 0


# -- cheap refusals (issue 15): shape, refusal cache, bounded memory, per-address limit, timeouts
REAL_SHAPED = "AgQ1bJx5nWKDNKy6dEmR0bdWqkVjoPYJ7pmnz1jDlM9KqdXK3WUcgEe9G4zeBmYeDpl2ZrJXVm3lgCzJ5a"
ADDRESS = "203.0.113.7"


def random_token(i: int) -> str:
    """A well-formed token nobody issued (the shape of a Globus access token)."""
    return "Ag" + hashlib.sha256(str(i).encode()).hexdigest()[:60]


@pytest.mark.parametrize(
    "token",
    [
        "short",  # under 20 characters
        "x" * 2049,  # over 2048
        "has space in the middle of it ok",
        'quote"in-the-token-0123456789',
        "\u00e9" * 40,  # not ASCII
        "tab\tinside-the-token-0123456789",
        "semicolon;inside-the-token-0123456789",
        "==leading-padding-0123456789",
    ],
    ids=["short", "long", "space", "quote", "non-ascii", "tab", "semicolon", "padding-first"],
)
def test_malformed_token_is_a_401_without_any_call_to_globus(
    globus: responses.RequestsMock, authenticator: Authenticator, token: str
) -> None:
    fake_globus(globus, introspection())

    with pytest.raises(AuthenticationError) as refused:
        authenticator.authenticate(f"Bearer {token}", ADDRESS)

    assert refused.value.status == 401
    assert "malformed" in refused.value.message
    assert len(globus.calls) == 0


@pytest.mark.parametrize("token", [TOKEN, OTHER_TOKEN, REAL_SHAPED, "A" * 20, "A" * 2048])
def test_well_formed_tokens_reach_globus(
    globus: responses.RequestsMock, authenticator: Authenticator, token: str
) -> None:
    fake_globus(globus, introspection())

    assert authenticator.authenticate(bearer(token), ADDRESS).user_id == ALICE_ANL
    assert form(calls_to(globus, INTROSPECT_URL)[0])["token"] == [token]


def test_refused_tokens_are_remembered_by_hash_for_the_setting(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "refused_token_cache_seconds", 30.0)
    fake_globus(globus, introspection(active=False))
    for _ in range(3):
        with pytest.raises(AuthenticationError):
            authenticator.authenticate(bearer())
    assert len(calls_to(globus, INTROSPECT_URL)) == 1

    until = authenticator._refused.until(token_hash(TOKEN))
    assert until == pytest.approx(time.time() + 30, abs=2)
    assert authenticator._refused.until(TOKEN) is None  # keyed by hash, never by the token
    later = time.time() + 31
    monkeypatch.setattr(first_core.auth, "time", types.SimpleNamespace(time=lambda: later))
    with pytest.raises(AuthenticationError):
        authenticator.authenticate(bearer())
    assert len(calls_to(globus, INTROSPECT_URL)) == 2


def test_the_refusal_cache_is_bounded(
    globus: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "refused_token_cache_entries", 5)
    fake_globus(globus, introspection(active=False))
    authenticator = Authenticator()
    for i in range(40):
        with pytest.raises(AuthenticationError):
            authenticator.authenticate(bearer(random_token(i)))

    assert len(authenticator._refused) == 5
    # the most recent are the ones kept
    assert authenticator._refused.until(token_hash(random_token(39))) is not None
    assert authenticator._refused.until(token_hash(random_token(0))) is None


def test_the_verdict_cache_is_a_bounded_lru(
    globus: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "token_cache_entries", 3)
    fake_globus(globus, introspection())
    authenticator = Authenticator()
    tokens = [random_token(i) for i in range(10)]
    for token in tokens:
        authenticator.authenticate(bearer(token))
    authenticator.authenticate(bearer(tokens[7]))  # used again: the most recent
    authenticator.authenticate(bearer(random_token(99)))

    assert len(authenticator._verdicts) == 3
    kept = {t for t in [*tokens, random_token(99)] if authenticator._verdicts.until(token_hash(t))}
    assert kept == {tokens[7], tokens[9], random_token(99)}
    # A verdict dropped from memory is still in the table: no new introspection.
    introspections = len(calls_to(globus, INTROSPECT_URL))
    assert authenticator.authenticate(bearer(tokens[0])).user_id == ALICE_ANL
    assert len(calls_to(globus, INTROSPECT_URL)) == introspections


@pytest.fixture
def tight_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(get_settings(), "auth_failures_per_address", 5)
    monkeypatch.setattr(get_settings(), "auth_failure_window_seconds", 60)
    return 5


def test_past_the_failure_limit_an_address_gets_429_before_any_call_to_globus(
    globus: responses.RequestsMock, authenticator: Authenticator, tight_limit: int
) -> None:
    fake_globus(globus, introspection(active=False))
    for i in range(tight_limit):
        with pytest.raises(AuthenticationError):
            authenticator.authenticate(bearer(random_token(i)), ADDRESS)
    assert len(calls_to(globus, INTROSPECT_URL)) == tight_limit

    with pytest.raises(RateLimitError) as limited:
        authenticator.authenticate(bearer(random_token(100)), ADDRESS)

    assert limited.value.status == 429
    assert limited.value.code == "too_many_failed_authentications"
    assert 1 <= int(limited.value.headers["Retry-After"]) <= 60
    assert len(calls_to(globus, INTROSPECT_URL)) == tight_limit  # Globus was not asked
    # Another address is not affected.
    with pytest.raises(AuthenticationError):
        authenticator.authenticate(bearer(random_token(101)), "198.51.100.1")


def test_malformed_tokens_count_against_the_address_too(
    globus: responses.RequestsMock, authenticator: Authenticator, tight_limit: int
) -> None:
    fake_globus(globus, introspection())
    for _ in range(tight_limit):
        with pytest.raises(AuthenticationError):
            authenticator.authenticate("Bearer garbage", ADDRESS)

    with pytest.raises(RateLimitError):
        authenticator.authenticate("Bearer garbage", ADDRESS)
    with pytest.raises(RateLimitError):  # even a valid token, when it is not cached
        authenticator.authenticate(bearer(), ADDRESS)
    assert len(globus.calls) == 0
    # No header, or another scheme, is not a failed authentication: still a 401.
    with pytest.raises(AuthenticationError):
        authenticator.authenticate(None, "198.51.100.2")
    assert used("authfail#198.51.100.2#" + str(int(time.time() // 60) * 60)) == 0


def test_a_cached_valid_token_is_never_refused_because_of_its_address(
    globus: responses.RequestsMock, authenticator: Authenticator, tight_limit: int
) -> None:
    fake_globus(globus, introspection())
    authenticator.authenticate(bearer(), ADDRESS)  # cached (memory and table)
    for _ in range(tight_limit + 3):
        with pytest.raises((AuthenticationError, RateLimitError)):
            authenticator.authenticate("Bearer garbage", ADDRESS)

    assert authenticator.authenticate(bearer(), ADDRESS).user_id == ALICE_ANL
    # a cold instance, whose only cache is the table, lets it through too
    assert Authenticator().authenticate(bearer(), ADDRESS).user_id == ALICE_ANL
    assert len(calls_to(globus, INTROSPECT_URL)) == 1


def test_the_failure_limit_holds_across_instances(
    globus: responses.RequestsMock, tight_limit: int
) -> None:
    fake_globus(globus, introspection(active=False))
    instances = [Authenticator() for _ in range(tight_limit)]
    for i, instance in enumerate(instances):  # one failure on each instance
        with pytest.raises(AuthenticationError):
            instance.authenticate(bearer(random_token(i)), ADDRESS)

    with pytest.raises(RateLimitError):
        Authenticator().authenticate(bearer(random_token(50)), ADDRESS)
    window = int(time.time() // 60) * 60
    assert used(f"authfail#{ADDRESS}#{window}") == tight_limit
    assert len(calls_to(globus, INTROSPECT_URL)) == tight_limit


def test_an_ipv6_client_counts_by_its_64_network(
    globus: responses.RequestsMock, authenticator: Authenticator, tight_limit: int
) -> None:
    fake_globus(globus, introspection(active=False))
    for i in range(tight_limit):
        with pytest.raises(AuthenticationError):
            authenticator.authenticate(bearer(random_token(i)), f"2001:db8:1:2::{i + 1:x}")

    with pytest.raises(RateLimitError):
        authenticator.authenticate(bearer(random_token(77)), "2001:db8:1:2:ffff::1")


def test_a_globus_call_that_times_out_is_a_quick_503_and_is_not_retried(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "globus_retries", 3)
    globus.add(responses.POST, INTROSPECT_URL, body=requests.ReadTimeout("read timed out"))

    with pytest.raises(ServiceUnavailableError) as unavailable:
        authenticator.authenticate(bearer(), ADDRESS)

    assert unavailable.value.headers["Retry-After"] == "5"
    assert len(calls_to(globus, INTROSPECT_URL)) == 1  # no retry of a timeout
    assert TokenCacheEntry.count() == 0
    assert authenticator._refused.until(token_hash(TOKEN)) is None  # an outage is not a refusal


def test_every_globus_client_has_the_connect_and_read_timeouts_of_the_settings(
    globus: responses.RequestsMock, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "globus_connect_timeout_seconds", 1.5)
    monkeypatch.setattr(get_settings(), "globus_read_timeout_seconds", 2.5)
    seen: list[Any] = []
    real_send = requests.Session.send

    def send(self: requests.Session, request: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("timeout"))
        return real_send(self, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", send)
    fake_globus(globus, introspection())

    authenticator.authenticate(bearer())

    assert len(seen) == 3  # introspection, dependent tokens, Groups
    assert seen == [(1.5, 2.5)] * 3


def test_a_globus_auth_that_hangs_answers_503_within_the_read_timeout(
    aws: None, authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real socket that accepts and never answers (no mock in between)."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # read nothing, answer nothing
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", f"http://127.0.0.1:{port}/")
    s = get_settings()
    monkeypatch.setattr(s, "globus_client_id", CLIENT_ID)
    monkeypatch.setattr(s, "globus_client_secret", SecretStr(CLIENT_SECRET))
    monkeypatch.setattr(s, "globus_retries", 2)
    monkeypatch.setattr(s, "globus_read_timeout_seconds", 0.5)
    try:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError):
            authenticator.authenticate(bearer(), ADDRESS)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for each in held:
            each.close()
        listener.close()

    assert elapsed < 2.0  # one read timeout, no retries of it
    assert len(held) == 1
