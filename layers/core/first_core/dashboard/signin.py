"""Signing in to the dashboard: Globus's authorization code with PKCE, through globus-sdk's
native-app flow (`NativeAppAuthClient.oauth2_start_flow` / `oauth2_get_authorize_url` /
`oauth2_exchange_code_for_tokens`).

The native app is `FIRST_NATIVE_CLIENT_ID` (the one `first-auth` uses, registered at Globus
with the redirect URI `<base URL>/dashboard/callback`); locally the Globus Auth stand-in's dev
native app, whose authorize page signs in `alice` at once (another dev user with `?user=`).
The token the code buys is checked exactly as a bearer token is (`first_core.auth`:
introspection, identity provider, groups, the gateway's gates), then dropped: only the session
cookie remains.
"""

from __future__ import annotations

import logging

import globus_sdk

from first_core.auth import Caller, get_authenticator
from first_core.dashboard.sessions import pkce_verifier
from first_core.errors import AuthenticationError, ServiceUnavailableError
from first_core.settings import get_settings

log = logging.getLogger("first.dashboard")
CALLBACK_PATH = "/dashboard/callback"


def redirect_uri(base_url: str) -> str:
    """Where Globus sends the browser back: the dashboard's callback on this base URL."""
    return base_url.rstrip("/") + CALLBACK_PATH


def _flow(base_url: str, state: str) -> globus_sdk.NativeAppAuthClient:
    """The native app's client with the flow of the sign-in named by `state` started."""
    s = get_settings()
    if not s.native_client_id or not s.gateway_scope:
        raise ServiceUnavailableError(
            "Dashboard sign-in is not set up: FIRST_NATIVE_CLIENT_ID names no Globus native app."
        )
    client = globus_sdk.NativeAppAuthClient(s.native_client_id)
    client.oauth2_start_flow(
        redirect_uri=redirect_uri(base_url),
        requested_scopes=s.gateway_scope,
        verifier=pkce_verifier(state),
        state=state,
    )
    return client


def authorize_url(base_url: str, state: str, user: str | None = None) -> str:
    """Globus's authorize address for this sign-in. `user` is passed along as `user=`: the local
    stand-in signs in that dev user; Globus Auth ignores it."""
    extra = {"user": user} if user else None
    return str(_flow(base_url, state).oauth2_get_authorize_url(query_params=extra))


def finish(base_url: str, state: str, code: str, address: str | None) -> Caller:
    """Trade the code (with the sign-in's PKCE verifier) for a token, and find who it belongs
    to and that they may use the gateway (401/403 as for a bearer token)."""
    try:
        tokens = _flow(base_url, state).oauth2_exchange_code_for_tokens(code)
    except globus_sdk.GlobusAPIError as error:
        log.info("dashboard code exchange refused: %s %s", error.http_status, error.code)
        raise AuthenticationError(
            "Globus did not accept the sign-in (the code expired or was used); sign in again.",
            code="invalid_grant",
        ) from None
    scope = get_settings().gateway_scope
    token = next(
        (
            entry["access_token"]
            for entry in tokens.by_resource_server.values()
            if scope in str(entry.get("scope", "")).split()
        ),
        None,
    )
    if token is None:
        raise AuthenticationError("Globus granted no token for the gateway's scope.")
    authenticator = get_authenticator()
    caller = authenticator.authenticate(f"Bearer {token}", address)
    authenticator.authorize(caller)
    return caller
