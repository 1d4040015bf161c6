"""Local stand-in for Globus Auth and Globus Groups.

The gateway keeps its production code path (plain ``globus-sdk`` clients); only
globus-sdk's own settings point it here::

    GLOBUS_SDK_SERVICE_URL_AUTH=http://127.0.0.1:PORT/auth/
    GLOBUS_SDK_SERVICE_URL_GROUPS=http://127.0.0.1:PORT/groups/

Responses mimic the real services' JSON shapes. Tokens are stateless and
HMAC-signed, so tests and benchmarks can mint them without the server running.
The secrets here are public dev constants: never use them outside a laptop.

    python -m first_local.globus_standin serve --port 8765
    python -m first_local.globus_standin token alice

It also runs a native-app login (authorization code with PKCE, refresh tokens,
revocation), which is what ``first-auth login`` drives, and the ``client_credentials``
grant of confidential clients: the gateway's own client, which is also its Globus Compute
client (``GLOBUS_COMPUTE_CLIENT_ID``/``_SECRET``, as on AWS; the Compute stand-in takes its
token), and a dev service account, a pipeline that calls the gateway with its own client
identity (``FIRST_SERVICE_ACCOUNTS``). There is no login page:
``/auth/v2/oauth2/authorize`` signs in the dev user named by the query parameter
``user`` (alice by default) and redirects straight back with a code. Codes and
refresh tokens are signed and stateless like the access tokens; only revocation
and one-time use of codes are remembered, in memory.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import parse_qs, urlencode

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

# Every id is a uuid5 under this namespace so that ids survive restarts and
# can be hard-coded in gateway configs and outside checks.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://first.local/globus-standin")


def _stable_id(name: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, name))


ALLOWED_GROUP_ID = _stable_id("group:FIRST users")
ADMIN_GROUP_ID = _stable_id("group:FIRST admins")
_GROUP_NAMES = {ALLOWED_GROUP_ID: "FIRST users", ADMIN_GROUP_ID: "FIRST admins"}

DEV_CLIENT_ID = _stable_id("client:first-gateway")
DEV_CLIENT_SECRET = "first-dev-gateway-client-secret-not-for-production"
DEV_GATEWAY_SCOPE = f"https://auth.globus.org/scopes/{DEV_CLIENT_ID}/action_all"
# Users' tokens are issued to a native app (the CLI/notebook), not to the gateway.
DEV_NATIVE_CLIENT_ID = _stable_id("client:first-dev-native-app")

# A service account: an automated pipeline calling the gateway as itself (its client identity).
DEV_SERVICE_CLIENT_ID = _stable_id("client:first-dev-pipeline")
DEV_SERVICE_CLIENT_SECRET = "first-dev-pipeline-client-secret-not-for-production"
# Confidential clients and their secrets (the client_credentials grant); the groups each
# client identity is in (Globus lets a client identity join a group).
CONFIDENTIAL_CLIENTS = {
    DEV_CLIENT_ID: DEV_CLIENT_SECRET,
    DEV_SERVICE_CLIENT_ID: DEV_SERVICE_CLIENT_SECRET,
}
_CLIENT_NAMES = {
    DEV_CLIENT_ID: "FIRST gateway (dev)",
    DEV_SERVICE_CLIENT_ID: "FIRST dev pipeline",
}
_CLIENT_GROUPS = {DEV_SERVICE_CLIENT_ID: (ALLOWED_GROUP_ID,)}
CLIENT_IDENTITY_DOMAIN = "clients.auth.globus.org"
# globus_sdk.scopes.ComputeScopes.all; Globus names its resource server "funcx_service".
COMPUTE_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
COMPUTE_RESOURCE_SERVER = "funcx_service"
_NAMED_RESOURCE_SERVERS = {"facd7ccc-c5f4-42aa-916b-a0e270e2c2a9": COMPUTE_RESOURCE_SERVER}
_CLIENT_TOKEN_LIFETIME_S = 48 * 3600

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
DEPENDENT_TOKEN_GRANT = "urn:globus:auth:grant_type:dependent_token"
_DEPENDENT_LIFETIME_S = 48 * 3600
_ISSUER = "https://auth.globus.org"

AUTH_RESOURCE_SERVER = "auth.globus.org"
# Users' native apps may log in only with these client ids (Globus checks its registrations).
NATIVE_CLIENT_IDS = frozenset({DEV_NATIVE_CLIENT_ID})
_CODE_LIFETIME_S = 600
_REFRESH_LIFETIME_S = 180 * 24 * 3600
_ID_TOKEN_ALG = "RS512"  # what Globus Auth signs id_tokens with

_DEFAULT_TOKEN_SECRET = "first-dev-token-signing-secret-not-for-production"
_TOKEN_PREFIX = "firstdev."


@dataclass(frozen=True)
class DevIdentity:
    """A dev user the stand-in knows: identity, identity provider, groups."""

    username: str
    name: str
    email: str
    sub: str
    idp_id: str
    idp_name: str
    groups: tuple[str, ...]


def _identity(username: str, name: str, idp_name: str, groups: tuple[str, ...]) -> DevIdentity:
    domain = username.split("@", 1)[1]
    return DevIdentity(
        username=username,
        name=name,
        email=username,
        sub=_stable_id(f"identity:{username}"),
        idp_id=_stable_id(f"idp:{domain}"),
        idp_name=idp_name,
        groups=groups,
    )


DEV_IDENTITIES: dict[str, DevIdentity] = {
    "alice": _identity(
        "alice@anl.gov", "Alice Anderson", "Argonne National Laboratory", (ALLOWED_GROUP_ID,)
    ),
    "bob": _identity("bob@uchicago.edu", "Bob Brown", "University of Chicago", ()),
    # Allowed group but a disallowed IdP: only the gateway's IdP check refuses her.
    "carol": _identity("carol@example.org", "Carol Clark", "Example Org", (ALLOWED_GROUP_ID,)),
    "dave": _identity(
        "dave@anl.gov",
        "Dave Davis",
        "Argonne National Laboratory",
        (ALLOWED_GROUP_ID, ADMIN_GROUP_ID),
    ),
}


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


async def _form(request: Request) -> dict[str, str]:
    # Parsed by hand: Starlette's request.form() needs python-multipart,
    # which the gateway's environment does not ship.
    parsed = parse_qs((await request.body()).decode("utf-8", "replace"))
    return {key: values[-1] for key, values in parsed.items()}


def _bearer(request: Request) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


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


def _oauth_error(error: str, description: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


@dataclass
class _State:
    calls: Counter[str] = field(default_factory=Counter)
    revoked: set[str] = field(default_factory=set)
    used_codes: set[str] = field(default_factory=set)


def create_app(
    *,
    secret: str | None = None,
    client_id: str = DEV_CLIENT_ID,
    client_secret: str = DEV_CLIENT_SECRET,
    failing_policies: frozenset[str] = frozenset(),
    native_client_ids: frozenset[str] = NATIVE_CLIENT_IDS,
    access_token_lifetime_s: int = 48 * 3600,
    confidential_clients: dict[str, str] | None = None,
) -> Starlette:
    """One app serving Auth under ``/auth`` and Groups under ``/groups``.

    ``access_token_lifetime_s`` is the lifetime of the access tokens a native-app
    login or refresh issues (Globus's default is 48 hours).
    """
    expected_basic = "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
    confidential_clients = {
        **(CONFIDENTIAL_CLIENTS if confidential_clients is None else confidential_clients),
        client_id: client_secret,
    }

    def client_ok(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), expected_basic.encode())

    def invalid_client() -> JSONResponse:
        return JSONResponse({"error": "invalid_client"}, status_code=401)

    # The little state a stateless stand-in keeps: call counts, revoked tokens, used codes.
    request_state = _State()

    async def introspect(request: Request) -> JSONResponse:
        request.app.state.calls["introspect"] += 1
        if not client_ok(request):
            return invalid_client()
        form = await _form(request)
        claims = live(form.get("token", ""))
        if claims is None or claims["kind"] not in ("access", "groups", "client"):
            return JSONResponse({"active": False})
        return JSONResponse(_introspection(claims, form, client_id, failing_policies))

    def live(token: str) -> dict[str, Any] | None:
        """A genuine, unexpired, unrevoked token's claims."""
        claims = _verify(token, secret)
        if claims is None or _token_hash(token) in request_state.revoked:
            return None
        return claims

    def token_entry(
        claims: dict[str, Any], server: str, scope: str, refresh_token: str | None
    ) -> dict[str, Any]:
        now = int(time.time())
        entry: dict[str, Any] = {
            "access_token": _access_token(
                claims["user"],
                scope=scope,
                iat=now,
                exp=now + access_token_lifetime_s,
                client_id=claims["client_id"],
                session_id=claims["session_id"],
                secret=secret,
            ),
            "expires_in": access_token_lifetime_s,
            "resource_server": server,
            "scope": scope,
            "token_type": "Bearer",
        }
        if refresh_token is not None:
            entry["refresh_token"] = refresh_token
        return entry

    def new_refresh_token(claims: dict[str, Any], server: str, scope: str) -> str:
        now = int(time.time())
        refresh_claims = {
            "user": claims["user"],
            "sub": claims["sub"],
            "scope": scope,
            "resource_server": server,
            "client_id": claims["client_id"],
            "session_id": claims["session_id"],
            "iat": now,
            "exp": now + _REFRESH_LIFETIME_S,
            "kind": "refresh",
            "jti": uuid.uuid4().hex,
        }
        return _sign(refresh_claims, secret)

    async def authorize(request: Request) -> Response:
        """The native-app login: no page, the dev user comes from ``?user=`` (alice)."""
        request.app.state.calls["authorize"] += 1
        query = request.query_params
        if query.get("response_type") != "code":
            return _oauth_error("unsupported_response_type", "response_type must be code")
        native = query.get("client_id", "")
        if native not in native_client_ids:
            return _oauth_error("invalid_client", "unknown native app client_id")
        redirect_uri, scope = query.get("redirect_uri", ""), query.get("scope", "").strip()
        if not redirect_uri.startswith(("http://", "https://")) or not scope:
            return _oauth_error("invalid_request", "redirect_uri and scope are required")
        challenge = query.get("code_challenge", "")
        if query.get("code_challenge_method") != "S256" or len(challenge) != 43:
            return _oauth_error("invalid_request", "PKCE with code_challenge_method=S256 required")
        user = query.get("user", "alice")
        if user not in DEV_IDENTITIES:
            return _oauth_error("invalid_request", f"unknown dev user {user!r}")
        now = int(time.time())
        code_claims = {
            "user": user,
            "sub": DEV_IDENTITIES[user].sub,
            "scope": scope,
            "client_id": native,
            "redirect_uri": redirect_uri,
            "code_challenge": challenge,
            "offline": query.get("access_type") == "offline",
            "session_id": str(uuid.uuid4()),
            "iat": now,
            "exp": now + _CODE_LIFETIME_S,
            "kind": "code",
        }
        params = {"code": _sign(code_claims, secret)}
        if "state" in query:
            params["state"] = query["state"]
        sep = "&" if "?" in redirect_uri else "?"
        return RedirectResponse(f"{redirect_uri}{sep}{urlencode(params)}", status_code=302)

    async def auth_code_page(request: Request) -> PlainTextResponse:
        # Globus's helper page that native apps redirect to by default.
        code = request.query_params.get("code", "")
        return PlainTextResponse(f"Native App Authorization Code\n\n{code}\n")

    async def native_grant(form: dict[str, str]) -> JSONResponse:
        request_state.calls["token_grants"] += 1
        native = form.get("client_id", "")
        if native not in native_client_ids:
            return _oauth_error("invalid_client", "unknown native app client_id", 401)
        if form["grant_type"] == "refresh_token":
            claims = live(form.get("refresh_token", ""))
            if claims is None or claims["kind"] != "refresh" or claims["client_id"] != native:
                return _oauth_error("invalid_grant", "invalid refresh token")
            entry = token_entry(
                claims, claims["resource_server"], claims["scope"], form["refresh_token"]
            )
            return JSONResponse({**entry, "other_tokens": []})
        code = form.get("code", "")
        claims = _verify(code, secret)
        if (
            claims is None
            or claims["kind"] != "code"
            or claims["client_id"] != native
            or claims["redirect_uri"] != form.get("redirect_uri")
        ):
            return _oauth_error("invalid_grant", "invalid authorization code")
        if not _pkce_ok(form.get("code_verifier", ""), claims["code_challenge"]):
            return _oauth_error("invalid_grant", "code_verifier does not match code_challenge")
        if _token_hash(code) in request_state.used_codes:
            return _oauth_error("invalid_grant", "authorization code already used")
        request_state.used_codes.add(_token_hash(code))
        entries = []
        for server, scopes in _scopes_by_server(claims["scope"]).items():
            scope = " ".join(scopes)
            refresh = new_refresh_token(claims, server, scope) if claims["offline"] else None
            entries.append(token_entry(claims, server, scope, refresh))
        # As in Globus: the Auth token (if any) is the top-level one, the rest other_tokens.
        entries.sort(key=lambda entry: entry["resource_server"] != AUTH_RESOURCE_SERVER)
        body: dict[str, Any] = {**entries[0], "other_tokens": entries[1:]}
        if "openid" in claims["scope"].split():
            ident = DEV_IDENTITIES[claims["user"]]
            body["id_token"] = _id_token(ident, native, claims["iat"], access_token_lifetime_s)
        return JSONResponse(body)

    async def revoke(request: Request) -> JSONResponse:
        request.app.state.calls["revoke"] += 1
        form = await _form(request)
        if not client_ok(request) and form.get("client_id", "") not in native_client_ids:
            return invalid_client()
        token_value = form.get("token", "")
        if token_value:
            request_state.revoked.add(_token_hash(token_value))
        return JSONResponse({"active": False})

    async def userinfo(request: Request) -> JSONResponse:
        claims = live(_bearer(request))
        if claims is None or claims["kind"] != "access" or "openid" not in claims["scope"].split():
            return JSONResponse({"error": "invalid_token"}, status_code=401)
        ident = DEV_IDENTITIES[claims["user"]]
        return JSONResponse(
            {
                "sub": ident.sub,
                "preferred_username": ident.username,
                "name": ident.name,
                "email": ident.email,
                "organization": ident.idp_name,
                "identity_provider": ident.idp_id,
                "identity_provider_display_name": ident.idp_name,
            }
        )

    async def openid_configuration(request: Request) -> JSONResponse:
        base = str(request.url).split(".well-known/", 1)[0]
        return JSONResponse(
            {
                "issuer": _ISSUER,
                "authorization_endpoint": f"{base}v2/oauth2/authorize",
                "token_endpoint": f"{base}v2/oauth2/token",
                "revocation_endpoint": f"{base}v2/oauth2/token/revoke",
                "userinfo_endpoint": f"{base}v2/oauth2/userinfo",
                "jwks_uri": f"{base}jwk.json",
                "response_types_supported": ["code"],
                "grant_types_supported": [
                    "authorization_code",
                    "refresh_token",
                    "client_credentials",
                ],
                "code_challenge_methods_supported": ["S256"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": [_ID_TOKEN_ALG],
                "scopes_supported": ["openid", "profile", "email"],
            }
        )

    async def jwk(request: Request) -> JSONResponse:
        return JSONResponse(_jwks())

    async def client_credentials_grant(request: Request, form: dict[str, str]) -> JSONResponse:
        """A confidential client's own token(s): HTTP Basic, one token per resource server."""
        request_state.calls["client_credentials"] += 1
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            given_id, _, given_secret = base64.b64decode(encoded).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            given_id = given_secret = ""
        expected = confidential_clients.get(given_id)
        if (
            scheme.lower() != "basic"
            or expected is None
            or not hmac.compare_digest(given_secret.encode(), expected.encode())
        ):
            return invalid_client()
        # globus-sdk asks for the same scope once per attached client: ask once, get one.
        by_server = _scopes_by_server(form.get("scope", "").strip())
        if not by_server:
            return _oauth_error("invalid_scope", "scope is required")
        now = int(time.time())
        entries = [
            {
                "access_token": _client_token(given_id, " ".join(scopes), now, secret),
                "expires_in": _CLIENT_TOKEN_LIFETIME_S,
                "resource_server": server,
                "scope": " ".join(scopes),
                "token_type": "Bearer",
            }
            for server, scopes in by_server.items()
        ]
        return JSONResponse({**entries[0], "other_tokens": entries[1:]})

    async def token(request: Request) -> JSONResponse:
        form = await _form(request)
        if form.get("grant_type") in ("authorization_code", "refresh_token"):
            return await native_grant(form)
        if form.get("grant_type") == "client_credentials":
            return await client_credentials_grant(request, form)
        request.app.state.calls["dependent_tokens"] += 1
        if not client_ok(request):
            return invalid_client()
        if form.get("grant_type") != DEPENDENT_TOKEN_GRANT:
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        claims = live(form.get("token", ""))
        # Only a token addressed to this client may be exchanged, as in Globus.
        if (
            claims is None
            or claims["kind"] not in ("access", "client")
            or client_id not in _resource_servers(claims["scope"])
        ):
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        wanted = form.get("scope", "").split()
        if wanted and GROUPS_SCOPE not in wanted:
            return JSONResponse({"error": "invalid_scope"}, status_code=400)
        now = int(time.time())
        groups_claims = {
            **claims,
            "scope": GROUPS_SCOPE,
            "iat": now,
            "exp": now + _DEPENDENT_LIFETIME_S,
            "client_id": client_id,
            "kind": "groups",
        }
        dependent = {
            "access_token": _sign(groups_claims, secret),
            "scope": GROUPS_SCOPE,
            "resource_server": GROUPS_RESOURCE_SERVER,
            "expires_in": _DEPENDENT_LIFETIME_S,
            "token_type": "Bearer",
        }
        return JSONResponse([dependent])

    async def my_groups(request: Request) -> JSONResponse:
        request.app.state.calls["my_groups"] += 1
        claims = _verify(_bearer(request), secret)
        if claims is None or claims["kind"] != "groups":
            return JSONResponse(
                {"code": "UNAUTHORIZED", "detail": "Invalid or expired bearer token"},
                status_code=401,
            )
        identity = _detail(claims)
        groups = [
            {
                "name": _GROUP_NAMES[group_id],
                "parent_id": None,
                "id": group_id,
                "group_type": "regular",
                "enforce_session": False,
                "session_limit": 28800,
                "session_timeouts": {},
                "my_memberships": [
                    {
                        "group_id": group_id,
                        "identity_id": identity["sub"],
                        "username": identity["username"],
                        "role": "member",
                        "status": "active",
                    }
                ],
                "policies": {
                    "group_visibility": "private",
                    "group_members_visibility": "managers",
                },
            }
            for group_id in _groups_of(claims)
        ]
        return JSONResponse(groups)

    async def calls(request: Request) -> JSONResponse:
        return JSONResponse(dict(request.app.state.calls))

    app = Starlette(
        routes=[
            Mount(
                "/auth",
                routes=[
                    Route("/v2/oauth2/token/introspect", introspect, methods=["POST"]),
                    Route("/v2/oauth2/token/revoke", revoke, methods=["POST"]),
                    Route("/v2/oauth2/token", token, methods=["POST"]),
                    Route("/v2/oauth2/authorize", authorize),
                    Route("/v2/oauth2/userinfo", userinfo, methods=["GET", "POST"]),
                    Route("/v2/web/auth-code", auth_code_page),
                    Route("/.well-known/openid-configuration", openid_configuration),
                    Route("/jwk.json", jwk),
                ],
            ),
            Mount("/groups", routes=[Route("/v2/groups/my_groups", my_groups)]),
            Route("/_standin/calls", calls),
        ]
    )
    app.state.calls = request_state.calls
    app.state.revoked = request_state.revoked
    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the Globus Auth and Groups stand-in, or print a dev user's access token."""
    parser = argparse.ArgumentParser(description="Local stand-in for Globus Auth and Groups.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the stand-in")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    token = commands.add_parser("token", help="print an access token for a dev user")
    token.add_argument("user", choices=sorted(DEV_IDENTITIES))
    token.add_argument("--expired", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "token":
        print(mint_token(args.user, expired=args.expired))
        return
    import uvicorn

    base = f"http://{args.host}:{args.port}"
    print(f"GLOBUS_SDK_SERVICE_URL_AUTH={base}/auth/")
    print(f"GLOBUS_SDK_SERVICE_URL_GROUPS={base}/groups/")
    uvicorn.run(create_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
