"""Every refusal of the Authorization section of issue 4, through the real `openai` package
against the real local stack (Globus stand-in, moto server): the exception class the SDK
raises, and a message that tells the user what to do.

Already covered in `test_request_path.py`, not repeated here: a garbage token
(`test_bad_token_is_authentication_error`), an expired token
(`test_expired_token_is_authentication_error`), an identity provider outside the allowed
domains (`test_identity_provider_not_allowed_names_the_allowed_ones`), a user outside the
allowed groups (`test_user_outside_allowed_groups_is_permission_denied`), alice's whoami
(`test_whoami_and_health`). Outages of Globus, failed policy evaluations, allowed groups per
domain and service accounts need answers the stand-in cannot give: `tests/unit/core/test_auth.py`.
"""

from __future__ import annotations

from typing import Any

import globus_sdk
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from first_local.globus_standin import (
    ALLOWED_GROUP_ID,
    DEV_GATEWAY_SCOPE,
    DEV_IDENTITIES,
    DEV_SERVICE_CLIENT_ID,
    DEV_SERVICE_CLIENT_SECRET,
    mint_token,
)
from tests.contract.conftest import Stack

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Who may use this?"}]


def error_of(raised: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, Any]:
    body = raised.value.response.json()
    assert set(body) == {"error"}
    return dict(body["error"])


def whoami(stack: Stack, token: str) -> httpx.Response:
    return httpx.get(
        f"{stack.base_url}/resource_server/v1/whoami",
        headers={"Authorization": f"Bearer {token}"},
    )


@pytest.mark.parametrize("federated", [True, False])
def test_no_token_is_authentication_error_saying_what_to_send(
    stack: Stack, federated: bool
) -> None:
    base = (
        f"{stack.base_url}/v1"
        if federated
        else (f"{stack.base_url}/resource_server/v1/sophia/vllm/v1")
    )
    # The SDK will not go without a key; `omit` drops the Authorization header it builds.
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)

    with pytest.raises(openai.AuthenticationError) as raised:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"Authorization": openai.omit}
        )

    assert "authorization" not in raised.value.response.request.headers

    error = error_of(raised)
    assert error["type"] == "authentication_error"
    assert "Globus access token" in error["message"]
    assert "first-auth token" in error["message"]


def test_garbage_token_on_models_is_authentication_error(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="garbage", max_retries=0)

    with pytest.raises(openai.AuthenticationError) as raised:
        client.models.list()

    assert "first-auth token" in error_of(raised)["message"]


def test_token_for_another_scope_is_authentication_error_mentioning_the_scope(
    stack: Stack,
) -> None:
    client = openai.OpenAI(
        base_url=f"{stack.base_url}/v1",
        api_key=mint_token("alice", scope="urn:other"),
        max_retries=0,
    )

    with pytest.raises(openai.AuthenticationError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)

    message = error_of(raised)["message"]
    assert "scope" in message
    assert "first-auth login" in message


def test_expired_token_is_refused_on_whoami_too(stack: Stack) -> None:
    response = whoami(stack, mint_token("alice", expired=True))

    assert response.status_code == 401
    assert "first-auth token" in response.json()["error"]["message"]


def test_disallowed_identity_provider_on_a_named_cluster_is_authentication_error(
    stack: Stack,
) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        stack.client("carol", federated=False, cluster="polaris").chat.completions.create(
            model=MODEL, messages=MESSAGES
        )

    message = error_of(raised)["message"]
    assert "example.org" in message
    assert "Log out of Globus" in message
    assert "anl.gov" in message and "uchicago.edu" in message


def test_disallowed_identity_provider_cannot_use_whoami(stack: Stack) -> None:
    """Carol is not authenticated at all (her provider is refused): 401, naming it."""
    response = whoami(stack, mint_token("carol"))

    assert response.status_code == 401
    assert "example.org" in response.json()["error"]["message"]


def test_authenticated_but_not_allowed_is_permission_denied_on_a_named_cluster(
    stack: Stack,
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as raised:
        stack.client("bob", federated=False, cluster="sophia").chat.completions.create(
            model=MODEL, messages=MESSAGES
        )

    error = error_of(raised)
    assert raised.value.status_code == 403
    assert error["type"] == "permission_error"
    assert "bob@uchicago.edu" in error["message"]
    assert "Ask the facility for access" in error["message"]


def test_whoami_shows_identity_provider_and_groups(stack: Stack) -> None:
    me = whoami(stack, mint_token("dave"))

    assert me.status_code == 200
    body = me.json()
    assert body["user_id"] == DEV_IDENTITIES["dave"].sub
    assert body["username"] == "dave@anl.gov"
    assert body["identity_provider"] == {
        "domain": "anl.gov",
        "name": "Argonne National Laboratory",
    }
    assert ALLOWED_GROUP_ID in body["groups"]
    assert body["is_admin"] is True


def test_whoami_tells_an_authenticated_but_not_allowed_user_who_they_are(stack: Stack) -> None:
    """whoami is how bob learns why he is refused: it must answer 200 with his groups."""
    me = whoami(stack, mint_token("bob"))

    assert me.status_code == 200
    assert me.json()["username"] == "bob@uchicago.edu"
    assert me.json()["identity_provider"]["domain"] == "uchicago.edu"
    assert me.json()["groups"] == []


def test_a_second_token_of_the_same_user_does_not_call_groups_again(stack: Stack) -> None:
    """Groups are cached per user: a new token costs one introspection and nothing else."""
    first = openai.OpenAI(
        base_url=f"{stack.base_url}/v1", api_key=mint_token("dave"), max_retries=0
    )
    first.models.list()
    before = stack.standin_calls()

    second = openai.OpenAI(
        base_url=f"{stack.base_url}/v1", api_key=mint_token("dave"), max_retries=0
    )
    second.models.list()
    second.models.list()
    after = stack.standin_calls()

    assert after.get("introspect", 0) - before.get("introspect", 0) == 1
    assert after.get("dependent_tokens", 0) == before.get("dependent_tokens", 0)
    assert after.get("my_groups", 0) == before.get("my_groups", 0)


def test_a_refused_token_is_not_introspected_again_at_once(stack: Stack) -> None:
    """Refusals are remembered briefly, so a client retrying a bad token does not hammer
    Globus."""
    token = mint_token("carol")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=token, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    before = stack.standin_calls()

    for _ in range(3):
        with pytest.raises(openai.AuthenticationError):
            client.models.list()

    assert stack.standin_calls().get("introspect", 0) == before.get("introspect", 0)


def test_a_service_account_gets_its_token_by_client_credentials_and_is_served(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline signs in as its own Globus client identity (no person, no identity
    provider): listed in FIRST_SERVICE_ACCOUNTS and in the allowed group, it is served."""
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", stack.state["globus_auth_url"])
    auth = globus_sdk.ConfidentialAppAuthClient(DEV_SERVICE_CLIENT_ID, DEV_SERVICE_CLIENT_SECRET)
    grant = auth.oauth2_client_credentials_tokens(requested_scopes=DEV_GATEWAY_SCOPE)
    token = str(grant.data["access_token"])

    me = whoami(stack, token)
    assert me.status_code == 200, me.text
    assert me.json()["username"] == f"{DEV_SERVICE_CLIENT_ID}@clients.auth.globus.org"
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=token, max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert reply.choices[0].message.content
