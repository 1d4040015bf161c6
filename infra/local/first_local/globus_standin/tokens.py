"""Tokens: stateless, HMAC-signed access, refresh and client tokens, what introspection says
of them, and the RS512-signed id_tokens of a login (with their JWKS)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
import uuid
from functools import cache
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from first_local.globus_standin.identities import (
    _CLIENT_GROUPS,
    _CLIENT_NAMES,
    _NAMED_RESOURCE_SERVERS,
    CLIENT_IDENTITY_DOMAIN,
    CONFIDENTIAL_CLIENTS,
    DEV_GATEWAY_SCOPE,
    DEV_IDENTITIES,
    DEV_NATIVE_CLIENT_ID,
    DEV_SERVICE_CLIENT_ID,
    DevIdentity,
    _stable_id,
)

_CLIENT_TOKEN_LIFETIME_S = 48 * 3600
_DEPENDENT_LIFETIME_S = 48 * 3600
_ISSUER = "https://auth.globus.org"
_CODE_LIFETIME_S = 600
_REFRESH_LIFETIME_S = 180 * 24 * 3600
_ID_TOKEN_ALG = "RS512"  # what Globus Auth signs id_tokens with
_DEFAULT_TOKEN_SECRET = "first-dev-token-signing-secret-not-for-production"
_TOKEN_PREFIX = "firstdev."


def _token_secret(secret: str | None) -> bytes:
    # Read the env at call time so a test or benchmark can switch secrets
    # without re-importing this module.
    return (secret or os.environ.get("FIRST_DEV_TOKEN_SECRET") or _DEFAULT_TOKEN_SECRET).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(claims: dict[str, Any], secret: str | None) -> str:
    payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(_token_secret(secret), payload.encode("ascii"), hashlib.sha256).digest()
    return f"{_TOKEN_PREFIX}{payload}.{_b64(mac)}"


def mint_token(
    user: str,
    *,
    expired: bool = False,
    lifetime_s: int = 48 * 3600,
    scope: str = DEV_GATEWAY_SCOPE,
    secret: str | None = None,
) -> str:
    """An access token for dev user ``user`` (a key of DEV_IDENTITIES)."""
    now = int(time.time())
    # Expired tokens keep their full lifetime, just shifted into the past.
    exp = now - 60 if expired else now + lifetime_s
    return _access_token(
        user,
        scope=scope,
        iat=exp - lifetime_s,
        exp=exp,
        client_id=DEV_NATIVE_CLIENT_ID,
        session_id=str(uuid.uuid4()),
        secret=secret,
    )


def _access_token(
    user: str,
    *,
    scope: str,
    iat: int,
    exp: int,
    client_id: str,
    session_id: str,
    secret: str | None,
) -> str:
    # The one shape of access token: mint_token's and the native-app login's alike.
    claims = {
        "user": user,
        "sub": DEV_IDENTITIES[user].sub,
        "scope": scope,
        "iat": iat,
        "exp": exp,
        "client_id": client_id,
        "session_id": session_id,
        "kind": "access",
        # Two tokens issued in the same second must still differ (a refresh, say).
        "jti": uuid.uuid4().hex,
    }
    return _sign(claims, secret)


def _verify(token: str, secret: str | None) -> dict[str, Any] | None:
    """The claims of a genuine, unexpired token, or None (never says why: Globus doesn't)."""
    if not token.startswith(_TOKEN_PREFIX):
        return None
    payload, _, mac = token[len(_TOKEN_PREFIX) :].partition(".")
    try:
        expected = hmac.new(_token_secret(secret), payload.encode("ascii"), hashlib.sha256)
        if not hmac.compare_digest(expected.digest(), _unb64(mac)):
            return None
        claims: dict[str, Any] = json.loads(_unb64(payload))
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return None
    if claims.get("exp", 0) <= time.time():
        return None
    if "client" in claims:  # a client identity's own token (client_credentials)
        known = claims["client"] in CONFIDENTIAL_CLIENTS and claims.get("sub") == claims["client"]
        return claims if known else None
    ident = DEV_IDENTITIES.get(claims.get("user", ""))
    if ident is None or ident.sub != claims.get("sub"):
        return None
    return claims


def client_token_claims(token: str, secret: str | None = None) -> dict[str, Any] | None:
    """The claims of a genuine, unexpired client-credentials token (None for anything else):
    how the Compute stand-in, another service of the same Globus, knows its caller."""
    claims = _verify(token, secret)
    return claims if claims is not None and claims.get("kind") == "client" else None


def mint_client_token(
    client_id: str = DEV_SERVICE_CLIENT_ID,
    scope: str = DEV_GATEWAY_SCOPE,
    secret: str | None = None,
) -> str:
    """The token the client_credentials grant gives `client_id` (the dev service account by
    default, for the gateway's scope), minted offline like `mint_token`."""
    return _client_token(client_id, scope, int(time.time()), secret)


def _client_token(client_id: str, scope: str, now: int, secret: str | None) -> str:
    claims = {
        "client": client_id,
        "sub": client_id,
        "client_id": client_id,
        "scope": scope,
        "iat": now,
        "exp": now + _CLIENT_TOKEN_LIFETIME_S,
        "kind": "client",
        "jti": uuid.uuid4().hex,
    }
    return _sign(claims, secret)


def _resource_servers(scope: str) -> list[str]:
    servers: list[str] = []
    for item in scope.split():
        if item.startswith("https://auth.globus.org/scopes/"):
            server = item.split("/")[4]
            server = _NAMED_RESOURCE_SERVERS.get(server, server)
        elif item.startswith("urn:globus:auth:scope:"):
            server = item.split(":")[4]
        else:
            server = "auth.globus.org"  # openid, profile, email
        if server not in servers:
            servers.append(server)
    return servers


def _identity_detail(ident: DevIdentity, auth_time: int) -> dict[str, Any]:
    return {
        "sub": ident.sub,
        "username": ident.username,
        "name": ident.name,
        "email": ident.email,
        "identity_provider": ident.idp_id,
        "identity_provider_display_name": ident.idp_name,
        "organization": ident.idp_name,
        "status": "used",
        "last_authentication": auth_time,
    }


def _client_detail(client_id: str) -> dict[str, Any]:
    """A client identity, as Globus Auth describes one: the client is its own identity."""
    return {
        "sub": client_id,
        "username": f"{client_id}@{CLIENT_IDENTITY_DOMAIN}",
        "name": _CLIENT_NAMES.get(client_id, "client"),
        "email": None,
        "identity_provider": _stable_id(f"idp:{CLIENT_IDENTITY_DOMAIN}"),
        "identity_provider_display_name": "Globus Auth (client identities)",
        "organization": None,
        "status": "used",
    }


def _detail(claims: dict[str, Any]) -> dict[str, Any]:
    """The identity behind a token: a dev user's, or a client's own."""
    if "client" in claims:
        return _client_detail(claims["client"])
    return _identity_detail(DEV_IDENTITIES[claims["user"]], claims["iat"])


def _groups_of(claims: dict[str, Any]) -> tuple[str, ...]:
    if "client" in claims:
        return _CLIENT_GROUPS.get(claims["client"], ())
    return DEV_IDENTITIES[claims["user"]].groups


def _introspection(
    claims: dict[str, Any], form: dict[str, str], client_id: str, failing: frozenset[str]
) -> dict[str, Any]:
    identity = _detail(claims)
    aud = _resource_servers(claims["scope"])
    if client_id not in aud:
        aud.append(client_id)
    body: dict[str, Any] = {
        "active": True,
        "token_type": "Bearer",
        "scope": claims["scope"],
        "client_id": claims["client_id"],
        "sub": identity["sub"],
        "username": identity["username"],
        "name": identity["name"],
        "email": identity["email"],
        "exp": claims["exp"],
        "iat": claims["iat"],
        "nbf": claims["iat"],
        "aud": aud,
        "iss": _ISSUER,
    }
    include = {part.strip() for part in form.get("include", "").split(",")}
    if "identity_set" in include:
        body["identity_set"] = [identity["sub"]]
    if "identity_set_detail" in include:
        body["identity_set_detail"] = [identity]
    if "session_info" in include:
        # A client signs in with its secret, not through an identity provider: no session.
        authentications = {}
        if "client" not in claims:
            auth = {"idp": identity["identity_provider"], "auth_time": claims["iat"], "amr": None}
            authentications[identity["sub"]] = auth
        body["session_info"] = {
            "session_id": claims.get("session_id"),
            "authentications": authentications,
        }
    policies = [p.strip() for p in form.get("authentication_policies", "").split(",") if p.strip()]
    if policies:
        body["policy_evaluations"] = {p: {"evaluation": p not in failing} for p in policies}
    return body


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def _pkce_ok(verifier: str, challenge: str) -> bool:
    """RFC 7636 S256: the challenge is base64url(sha256(verifier)) without padding."""
    if not 43 <= len(verifier) <= 128 or not verifier.isascii():
        return False
    expected = _b64(hashlib.sha256(verifier.encode("ascii")).digest())
    return hmac.compare_digest(expected.encode(), challenge.encode("utf-8", "replace"))


def _scopes_by_server(scope: str) -> dict[str, list[str]]:
    """Requested scopes grouped by resource server, in the order asked (one token each)."""
    grouped: dict[str, list[str]] = {}
    for item in scope.split():
        [server] = _resource_servers(item)
        if item not in grouped.setdefault(server, []):
            grouped[server].append(item)
    return grouped


@cache
def _id_token_key() -> rsa.RSAPrivateKey:
    # One key per process: id_tokens are only decoded while a login completes.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwks() -> dict[str, Any]:
    public = jwt.algorithms.RSAAlgorithm.to_jwk(_id_token_key().public_key(), as_dict=True)
    public.update(alg=_ID_TOKEN_ALG, use="sig", kid="first-dev")
    return {"keys": [public]}


def _id_token(ident: DevIdentity, client_id: str, session_iat: int, lifetime_s: int) -> str:
    now = int(time.time())
    claims = {
        "iss": _ISSUER,
        "sub": ident.sub,
        "aud": client_id,
        "azp": client_id,
        "iat": now,
        "exp": now + lifetime_s,
        "session_iat": session_iat,
        "preferred_username": ident.username,
        "name": ident.name,
        "email": ident.email,
        "organization": ident.idp_name,
        "identity_provider": ident.idp_id,
        "identity_provider_display_name": ident.idp_name,
        "identity_set": [_identity_detail(ident, session_iat)],
    }
    return jwt.encode(
        claims, _id_token_key(), algorithm=_ID_TOKEN_ALG, headers={"kid": "first-dev"}
    )
