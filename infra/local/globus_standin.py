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
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
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

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
DEPENDENT_TOKEN_GRANT = "urn:globus:auth:grant_type:dependent_token"
_DEPENDENT_LIFETIME_S = 48 * 3600
_ISSUER = "https://auth.globus.org"

_DEFAULT_TOKEN_SECRET = "first-dev-token-signing-secret-not-for-production"
_TOKEN_PREFIX = "firstdev."


@dataclass(frozen=True)
class DevIdentity:
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
    ident = DEV_IDENTITIES[user]
    now = int(time.time())
    # Expired tokens keep their full lifetime, just shifted into the past.
    exp = now - 60 if expired else now + lifetime_s
    claims = {
        "user": user,
        "sub": ident.sub,
        "scope": scope,
        "iat": exp - lifetime_s,
        "exp": exp,
        "client_id": DEV_NATIVE_CLIENT_ID,
        "session_id": str(uuid.uuid4()),
        "kind": "access",
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
    ident = DEV_IDENTITIES.get(claims.get("user", ""))
    if ident is None or ident.sub != claims.get("sub") or claims.get("exp", 0) <= time.time():
        return None
    return claims


def _resource_servers(scope: str) -> list[str]:
    servers: list[str] = []
    for item in scope.split():
        if item.startswith("https://auth.globus.org/scopes/"):
            server = item.split("/")[4]
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


def _introspection(
    claims: dict[str, Any], form: dict[str, str], client_id: str, failing: frozenset[str]
) -> dict[str, Any]:
    ident = DEV_IDENTITIES[claims["user"]]
    aud = _resource_servers(claims["scope"])
    if client_id not in aud:
        aud.append(client_id)
    body: dict[str, Any] = {
        "active": True,
        "token_type": "Bearer",
        "scope": claims["scope"],
        "client_id": claims["client_id"],
        "sub": ident.sub,
        "username": ident.username,
        "name": ident.name,
        "email": ident.email,
        "exp": claims["exp"],
        "iat": claims["iat"],
        "nbf": claims["iat"],
        "aud": aud,
        "iss": _ISSUER,
    }
    include = {part.strip() for part in form.get("include", "").split(",")}
    if "identity_set" in include:
        body["identity_set"] = [ident.sub]
    if "identity_set_detail" in include:
        body["identity_set_detail"] = [_identity_detail(ident, claims["iat"])]
    if "session_info" in include:
        auth = {"idp": ident.idp_id, "auth_time": claims["iat"], "amr": None}
        body["session_info"] = {
            "session_id": claims["session_id"],
            "authentications": {ident.sub: auth},
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


def create_app(
    *,
    secret: str | None = None,
    client_id: str = DEV_CLIENT_ID,
    client_secret: str = DEV_CLIENT_SECRET,
    failing_policies: frozenset[str] = frozenset(),
) -> Starlette:
    """One app serving Auth under ``/auth`` and Groups under ``/groups``."""
    expected_basic = "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()

    def client_ok(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), expected_basic.encode())

    def invalid_client() -> JSONResponse:
        return JSONResponse({"error": "invalid_client"}, status_code=401)

    async def introspect(request: Request) -> JSONResponse:
        request.app.state.calls["introspect"] += 1
        if not client_ok(request):
            return invalid_client()
        form = await _form(request)
        claims = _verify(form.get("token", ""), secret)
        if claims is None:
            return JSONResponse({"active": False})
        return JSONResponse(_introspection(claims, form, client_id, failing_policies))

    async def token(request: Request) -> JSONResponse:
        request.app.state.calls["dependent_tokens"] += 1
        if not client_ok(request):
            return invalid_client()
        form = await _form(request)
        if form.get("grant_type") != DEPENDENT_TOKEN_GRANT:
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        claims = _verify(form.get("token", ""), secret)
        # Only a token addressed to this client may be exchanged, as in Globus.
        if (
            claims is None
            or claims["kind"] != "access"
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
        ident = DEV_IDENTITIES[claims["user"]]
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
                        "identity_id": ident.sub,
                        "username": ident.username,
                        "role": "member",
                        "status": "active",
                    }
                ],
                "policies": {
                    "group_visibility": "private",
                    "group_members_visibility": "managers",
                },
            }
            for group_id in ident.groups
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
                    Route("/v2/oauth2/token", token, methods=["POST"]),
                ],
            ),
            Mount("/groups", routes=[Route("/v2/groups/my_groups", my_groups)]),
            Route("/_standin/calls", calls),
        ]
    )
    app.state.calls = Counter[str]()
    return app


def main(argv: list[str] | None = None) -> None:
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
