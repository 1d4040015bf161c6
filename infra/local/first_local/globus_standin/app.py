"""The routes: Globus Auth under `/auth` (introspection, dependent tokens, the native-app
login, client credentials, revocation, userinfo, JWKS), Groups under `/groups`, the call
counts under `/_standin/calls`, and a fault switch, `POST /_standin/hang?seconds=S`: while
it is on, introspection, dependent tokens and Groups answer only after S seconds, as a Globus
that hangs (`seconds=0` turns it off and lets the waiting calls answer)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from first_local.globus_standin.identities import (
    _GROUP_NAMES,
    AUTH_RESOURCE_SERVER,
    CONFIDENTIAL_CLIENTS,
    DEPENDENT_TOKEN_GRANT,
    DEV_CLIENT_ID,
    DEV_CLIENT_SECRET,
    DEV_IDENTITIES,
    GROUPS_RESOURCE_SERVER,
    GROUPS_SCOPE,
    NATIVE_CLIENT_IDS,
)
from first_local.globus_standin.tokens import (
    _CLIENT_TOKEN_LIFETIME_S,
    _CODE_LIFETIME_S,
    _DEPENDENT_LIFETIME_S,
    _ID_TOKEN_ALG,
    _ISSUER,
    _REFRESH_LIFETIME_S,
    _access_token,
    _client_token,
    _detail,
    _groups_of,
    _id_token,
    _introspection,
    _jwks,
    _pkce_ok,
    _resource_servers,
    _scopes_by_server,
    _sign,
    _token_hash,
    _verify,
)


async def _form(request: Request) -> dict[str, str]:
    # Parsed by hand: Starlette's request.form() needs python-multipart,
    # which the gateway's environment does not ship.
    parsed = parse_qs((await request.body()).decode("utf-8", "replace"))
    return {key: values[-1] for key, values in parsed.items()}


def _bearer(request: Request) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _oauth_error(error: str, description: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


@dataclass
class _State:
    calls: Counter[str] = field(default_factory=Counter)
    revoked: set[str] = field(default_factory=set)
    used_codes: set[str] = field(default_factory=set)
    # The hang switch: how long the Globus calls a gateway makes wait before answering.
    hang_seconds: float = 0.0

    async def hang(self) -> None:
        """Wait while the hang switch is on (at most its seconds)."""
        started = time.monotonic()
        while self.hang_seconds and time.monotonic() - started < self.hang_seconds:
            await asyncio.sleep(0.05)


def create_app(
    *,
    secret: str | None = None,
    client_id: str = DEV_CLIENT_ID,
    client_secret: str = DEV_CLIENT_SECRET,
    failing_policies: frozenset[str] = frozenset(),
    native_client_ids: frozenset[str] = NATIVE_CLIENT_IDS,
    access_token_lifetime_s: int = 48 * 3600,
) -> Starlette:
    """One app serving Auth under ``/auth`` and Groups under ``/groups``.

    ``access_token_lifetime_s`` is the lifetime of the access tokens a native-app
    login or refresh issues (Globus's default is 48 hours).
    """
    expected_basic = "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
    confidential_clients = {**CONFIDENTIAL_CLIENTS, client_id: client_secret}

    def client_ok(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), expected_basic.encode())

    def invalid_client() -> JSONResponse:
        return JSONResponse({"error": "invalid_client"}, status_code=401)

    # The little state a stateless stand-in keeps: call counts, revoked tokens, used codes.
    request_state = _State()

    async def introspect(request: Request) -> JSONResponse:
        request.app.state.calls["introspect"] += 1
        await request_state.hang()
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
        await request_state.hang()
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
        await request_state.hang()
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

    async def hang(request: Request) -> JSONResponse:
        if request.method == "POST":
            try:
                seconds = float(request.query_params.get("seconds", "0"))
            except ValueError:
                return JSONResponse({"error": "seconds must be a number"}, status_code=400)
            request_state.hang_seconds = max(0.0, seconds)
        return JSONResponse({"hang_seconds": request_state.hang_seconds})

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
            Route("/_standin/hang", hang, methods=["GET", "POST"]),
        ]
    )
    app.state.calls = request_state.calls
    app.state.revoked = request_state.revoked
    return app
