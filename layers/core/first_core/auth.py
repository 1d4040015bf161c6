"""Who is calling: Globus token introspection, identity provider, groups, and the global gate.

Everything goes through `globus-sdk`; locally the SDK is pointed at a stand-in by its own
`GLOBUS_SDK_SERVICE_URL_*` settings, so this module has no local branch.

Verdicts are cached by the SHA-256 of the token, first in this instance's memory, then in the
`token_cache` table (so a cold instance does not call Globus again), never beyond the token's
own expiry. A revoked token therefore keeps working until `token_cache_seconds` have passed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import globus_sdk
from pynamodb.exceptions import DoesNotExist

from first_core.errors import AuthenticationError, PermissionDeniedError
from first_core.settings import get_settings
from first_core.tables import TokenCacheEntry, not_expired

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
# A refusal is remembered briefly so a client retrying a bad token does not hammer Globus.
_REFUSAL_CACHE_SECONDS = 10.0


@dataclass(frozen=True)
class Caller:
    """An authenticated user, as the gateway knows them for one request."""

    user_id: str  # Globus identity id (`sub`): the owner key of every object
    username: str
    name: str
    email: str
    idp_domain: str
    idp_name: str
    groups: frozenset[str] = field(default_factory=frozenset)
    token_expires_at: float = 0.0
    groups_checked_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["groups"] = sorted(self.groups)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Caller:
        return cls(**{**data, "groups": frozenset(data.get("groups", ()))})

    @property
    def is_admin(self) -> bool:
        return bool(self.groups & set(get_settings().admin_groups))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise AuthenticationError(
            "Missing bearer token. Send a Globus access token as the API key "
            "(Authorization: Bearer <token>); get one with `first-auth token`."
        )
    token = authorization[7:].strip()
    if not token or len(token) > 4096:
        raise AuthenticationError("The bearer token is empty or malformed.")
    return token


class Authenticator:
    """Turns a bearer token into a `Caller`, with the caches described above."""

    def __init__(self) -> None:
        self._settings = get_settings()
        self._memory: dict[str, tuple[float, Caller | AuthenticationError]] = {}
        self._lock = threading.Lock()
        self._client: globus_sdk.ConfidentialAppAuthClient | None = None

    # -- public -----------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> Caller:
        token = bearer_token(authorization)
        key = token_hash(token)
        caller = self._cached(key)
        if caller is None:
            caller = self._introspect_and_cache(token, key)
        if time.time() - caller.groups_checked_at > self._settings.groups_cache_seconds:
            caller = self._with_groups(caller, token)
            self._remember(key, caller)
        return caller

    def authorize(self, caller: Caller) -> None:
        """The global gate: the caller must be in one of the allowed groups."""
        allowed = set(self._settings.allowed_groups)
        if allowed and not caller.groups & allowed:
            raise PermissionDeniedError(
                f"{caller.username} is authenticated but is not a member of a Globus group "
                "allowed to use this gateway. Ask the facility for access."
            )

    # -- caches -----------------------------------------------------------------------
    def _cached(self, key: str) -> Caller | None:
        now = time.time()
        hit = self._memory.get(key)
        if hit is not None and hit[0] > now:
            if isinstance(hit[1], AuthenticationError):
                raise hit[1]
            return hit[1]
        try:
            entry = TokenCacheEntry.get(key, consistent_read=False)
        except DoesNotExist:
            return None
        if not not_expired(entry.expires_at):
            return None
        caller = Caller.from_json(entry.verdict)
        with self._lock:
            self._memory[key] = (entry.expires_at.timestamp(), caller)
        return caller

    def _remember(self, key: str, caller: Caller) -> None:
        until = min(time.time() + self._settings.token_cache_seconds, caller.token_expires_at)
        with self._lock:
            self._memory[key] = (until, caller)
        TokenCacheEntry(key, verdict=caller.to_json(), expires_at=_utc(until)).save()

    def _refuse(self, key: str, error: AuthenticationError) -> AuthenticationError:
        with self._lock:
            self._memory[key] = (time.time() + _REFUSAL_CACHE_SECONDS, error)
        return error

    # -- Globus -----------------------------------------------------------------------
    @property
    def client(self) -> globus_sdk.ConfidentialAppAuthClient:
        if self._client is None:
            self._client = globus_sdk.ConfidentialAppAuthClient(
                self._settings.globus_client_id,
                self._settings.globus_client_secret.get_secret_value(),
            )
        return self._client

    def _introspect_and_cache(self, token: str, key: str) -> Caller:
        data = self._introspect(token)
        try:
            caller = self._caller_from_introspection(data)
        except AuthenticationError as error:
            raise self._refuse(key, error) from None
        caller = self._with_groups(caller, token)
        self._remember(key, caller)
        return caller

    def _introspect(self, token: str) -> dict[str, Any]:
        include = "session_info,identity_set_detail"
        try:
            if self._settings.authentication_policies:
                # The SDK method has no parameter for policies; the endpoint takes them as a form.
                response = self.client.post(
                    "/v2/oauth2/token/introspect",
                    data={
                        "token": token,
                        "include": include,
                        "authentication_policies": ",".join(self._settings.authentication_policies),
                    },
                    encoding="form",
                )
            else:
                response = self.client.oauth2_token_introspect(token, include=include)
        except globus_sdk.GlobusAPIError as error:
            raise AuthenticationError(
                f"Globus Auth could not check the token (HTTP {error.http_status}). Retry shortly."
            ) from None
        return dict(response.data)

    def _caller_from_introspection(self, data: dict[str, Any]) -> Caller:
        s = self._settings
        if not data.get("active"):
            raise AuthenticationError(
                "The access token is inactive or expired. Get a new one with `first-auth token`."
            )
        exp = float(data.get("exp", 0))
        if exp + s.clock_skew_seconds < time.time():
            raise AuthenticationError(
                "The access token has expired. Get a new one with `first-auth token`."
            )
        if s.gateway_scope and s.gateway_scope not in str(data.get("scope", "")).split():
            raise AuthenticationError(
                "The access token was not issued for this gateway's scope. "
                "Log in again with `first-auth login`."
            )
        evaluations = data.get("policy_evaluations") or {}
        for policy in s.authentication_policies:
            if not (evaluations.get(policy) or {}).get("evaluation"):
                raise AuthenticationError(
                    f"Your Globus session does not satisfy authentication policy {policy} "
                    "(a high-assurance session may have timed out). "
                    "Log out of Globus and log in again."
                )
        identity = _session_identity(data)
        domain = identity.get("username", "").rpartition("@")[2].lower()
        if s.allowed_domains and domain not in {d.lower() for d in s.allowed_domains}:
            raise AuthenticationError(
                f"Your Globus session was authenticated through {domain or 'an unknown provider'}, "
                "which this gateway does not accept. Log out of Globus and sign in with an "
                f"identity from one of: {', '.join(s.allowed_domains)}."
            )
        return Caller(
            user_id=str(data.get("sub")),
            username=str(identity.get("username", data.get("username", ""))),
            name=str(identity.get("name") or data.get("name") or ""),
            email=str(identity.get("email") or data.get("email") or ""),
            idp_domain=domain,
            idp_name=str(identity.get("identity_provider_display_name", "")),
            token_expires_at=exp,
        )

    def _with_groups(self, caller: Caller, token: str) -> Caller:
        try:
            tokens = self.client.oauth2_get_dependent_tokens(token).by_resource_server
            groups_token = tokens[GROUPS_RESOURCE_SERVER]["access_token"]
            groups_client = globus_sdk.GroupsClient(
                authorizer=globus_sdk.AccessTokenAuthorizer(groups_token)
            )
            memberships = groups_client.get_my_groups()
        except (globus_sdk.GlobusAPIError, KeyError):
            raise AuthenticationError(
                "Could not read your Globus group memberships; "
                "log in again with `first-auth login`."
            ) from None
        groups = frozenset(str(group["id"]) for group in memberships)
        return Caller(**{**caller.__dict__, "groups": groups, "groups_checked_at": time.time()})


def _session_identity(data: dict[str, Any]) -> dict[str, Any]:
    """The identity the user actually signed in with in this session.

    A Globus account links many identities; the identity provider that matters is the one of the
    session's authentication, not of the primary identity.
    """
    details: list[dict[str, Any]] = data.get("identity_set_detail") or []
    authenticated = set((data.get("session_info") or {}).get("authentications") or {})
    for identity in details:
        if identity.get("sub") in authenticated:
            return identity
    for identity in details:
        if identity.get("sub") == data.get("sub"):
            return identity
    return {"username": data.get("username", ""), "sub": data.get("sub")}


def _utc(ts: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, tz=UTC)


_authenticator: Authenticator | None = None


def get_authenticator() -> Authenticator:
    global _authenticator
    if _authenticator is None:
        _authenticator = Authenticator()
    return _authenticator
