"""Who is calling: Globus token introspection, identity provider, groups, and the global gate.

Everything goes through `globus-sdk`; locally the SDK is pointed at a stand-in by its own
`GLOBUS_SDK_SERVICE_URL_*` settings, so this module has no local branch.

Two caches, each in this instance's memory and in the `token_cache` table (so a cold instance
does not call Globus again):

- **Verdicts**, keyed by the SHA-256 of the token. A verdict is trusted until
  `min(introspection time + token_cache_seconds, the token's exp)`; the memory entry and the
  table entry carry that same instant, and refreshing the groups never extends it. A revoked
  token therefore keeps working for at most `token_cache_seconds` (600 s by default).
- **Group memberships**, per USER (Globus identity id), so a new token of the same user does not
  call Groups again within `groups_cache_seconds`. They live in the `token_cache` table too,
  under the key `groups#<user_id>` (a SHA-256 hex digest never contains `#`, so the two kinds
  never collide): the table has the right shape (string hash key, JSON value, TTL on
  `expires_at`) and a table of their own would mean another template resource for one item
  per user. Readers filter on `expires_at`, since DynamoDB's TTL deletes late and moto never.

Both memory caches are bounded LRUs (`token_cache_entries`), so a flood of tokens cannot grow
them without bound.

Refusals are cheap (first_core.credentials, first_core.auth_failures): a token of the wrong
shape is a 401 before any call; refusals by Globus (inactive, expired, wrong scope, provider,
policy) are remembered in memory by token hash for `refused_token_cache_seconds` (a bounded
LRU too); every refused bearer token counts against its client address, which past
`auth_failures_per_address` gets 429 before any call to Globus unless its token is cached.
Every Globus call has a connect and a read timeout (`globus_connect_timeout_seconds`,
`globus_read_timeout_seconds`) and is not retried once timed out; outages of Globus (HTTP 5xx,
429, network, timeout) are never cached and answer 503 asking the client to retry.

Long because: introspection and the caches that guard it share one expiry rule (a revoked
token works at most `token_cache_seconds`) and one order of refusals (shape, caches, address
limit, Globus); apart, that rule and that order would be spread over several modules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, cast

from pynamodb.exceptions import DoesNotExist

from first_core.auth_failures import FailedAuthentications
from first_core.credentials import bearer_token, presents_bearer_token
from first_core.errors import (
    AuthenticationError,
    GatewayError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from first_core.lru import ExpiringLRU
from first_core.settings import get_settings
from first_core.tables import TokenCacheEntry

if TYPE_CHECKING:
    # Imported where Globus is called: a warm token, or one whose verdict is in DynamoDB (a cold
    # instance's usual case), never needs the SDK (and `requests`), ~0.1 s of a cold start.
    import globus_sdk
    from globus_sdk.transport import (
        RequestsTransport,
        RetryCheckResult,
        RetryConfig,
        RetryContext,
    )

__all__ = ["Authenticator", "Caller", "bearer_token", "get_authenticator", "token_hash"]

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
# Globus client identities (confidential apps acting as themselves) have usernames
# `<client_id>@clients.auth.globus.org`.
CLIENT_IDENTITY_DOMAIN = "clients.auth.globus.org"
GROUPS_KEY_PREFIX = "groups#"
# What a client is told to wait when Globus itself is down.
_OUTAGE_RETRY_AFTER = "5"


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
    # A listed Globus client identity: no identity-provider/domain check applies to it.
    is_service_account: bool = False
    # The verdict is trusted until then: min(introspection + token_cache_seconds, token exp).
    verdict_expires_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["groups"] = sorted(self.groups)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Caller:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**{**values, "groups": frozenset(data.get("groups", ()))})

    @property
    def is_admin(self) -> bool:
        return bool(self.groups & set(get_settings().admin_groups))


def token_hash(token: str) -> str:
    """The SHA-256 of a token in hex: how a token is named in caches and logs, never in clear."""
    return hashlib.sha256(token.encode()).hexdigest()


class Authenticator:
    """Turns a bearer token into a `Caller`, with the caches described above."""

    def __init__(self) -> None:
        self._settings = s = get_settings()
        self._verdicts: ExpiringLRU[Caller] = ExpiringLRU(s.token_cache_entries)
        self._refused: ExpiringLRU[AuthenticationError] = ExpiringLRU(s.refused_token_cache_entries)
        # user_id -> (groups, checked_at); trusted until checked_at + groups_cache_seconds
        self._user_groups: ExpiringLRU[tuple[frozenset[str], float]] = ExpiringLRU(
            s.token_cache_entries
        )
        self._failures = FailedAuthentications()
        self._client: globus_sdk.ConfidentialAppAuthClient | None = None

    # -- public -----------------------------------------------------------------------
    def authenticate(self, authorization: str | None, address: str | None = None) -> Caller:
        """Who the caller is (401 if that cannot be established). Does not authorize.

        `address` is the client's (first_core.credentials.source_address): a refused bearer
        token counts against it, and past its limit a token that is not cached gets 429
        before any call to Globus. None: no such limit (a caller that is not a client)."""
        try:
            return self._authenticate(authorization, address)
        except AuthenticationError:
            if presents_bearer_token(authorization):
                self._failures.count(address)  # past the limit: 429 instead
            raise

    def _authenticate(self, authorization: str | None, address: str | None) -> Caller:
        token = bearer_token(authorization)  # the shape, before anything else
        key = token_hash(token)
        caller = self._cached(key)
        if caller is None:
            self._failures.check(address)
            return self._introspect_and_cache(token, key)
        if time.time() - caller.groups_checked_at > self._settings.groups_cache_seconds:
            caller = self._with_groups(caller, token)
            self._remember(key, caller)
        return caller

    def authorize(self, caller: Caller) -> None:
        """The gateway-wide gates (403): the global allowed groups, then the allowed groups
        of the caller's identity-provider domain."""
        s = self._settings
        allowed = set(s.allowed_groups)
        if allowed and not caller.groups & allowed:
            raise PermissionDeniedError(
                f"{caller.username} is authenticated but is not a member of a Globus group "
                "allowed to use this gateway. Ask the facility for access."
            )
        required = domain_groups(caller.idp_domain)
        if required and not caller.groups & set(required):
            raise PermissionDeniedError(
                f"{caller.username} signed in through {caller.idp_domain}; users from "
                f"{caller.idp_domain} must be members of one of the Globus groups "
                f"{', '.join(required)}. Ask the facility for access, or sign in with "
                "another of your linked identities."
            )

    # -- caches -----------------------------------------------------------------------
    def _cached(self, key: str) -> Caller | None:
        """The verdict on a token: from memory, a refusal (raised) or a caller; else from
        the table; None if there is none."""
        now = time.time()
        refusal = self._refused.get(key, now)
        if refusal is not None:
            raise refusal
        hit = self._verdicts.get(key, now)
        if hit is not None:
            return hit
        try:
            entry = TokenCacheEntry.get(key, consistent_read=False)
        except DoesNotExist:
            return None
        until = entry.expires_at.timestamp() if entry.expires_at else 0.0
        if until <= now:  # DynamoDB deletes expired items late (moto never): filter here
            return None
        caller = Caller.from_json(entry.verdict)
        if not caller.verdict_expires_at:  # written before the field existed
            caller = dataclasses.replace(caller, verdict_expires_at=until)
        self._verdicts.put(key, caller, until)
        return caller

    def _remember(self, key: str, caller: Caller) -> None:
        # The instant was fixed at introspection: refreshing groups must not extend it,
        # or a revoked token would live on past token_cache_seconds.
        until = caller.verdict_expires_at
        self._verdicts.put(key, caller, until)
        TokenCacheEntry(key, verdict=caller.to_json(), expires_at=_utc(until)).save()

    def _refuse(self, key: str, error: AuthenticationError) -> AuthenticationError:
        until = time.time() + self._settings.refused_token_cache_seconds
        self._refused.put(key, error, until)
        return error

    def _cached_groups(self, user_id: str) -> tuple[frozenset[str], float] | None:
        """The user's groups if checked within groups_cache_seconds (memory, then table)."""
        now = time.time()
        ttl = self._settings.groups_cache_seconds
        hit = self._user_groups.get(user_id, now)
        if hit is not None:
            return hit
        try:
            entry = TokenCacheEntry.get(GROUPS_KEY_PREFIX + user_id, consistent_read=False)
        except DoesNotExist:
            return None
        checked_at = float(entry.verdict.get("checked_at", 0))
        expires = entry.expires_at.timestamp() if entry.expires_at else 0.0
        if expires <= now or checked_at + ttl <= now:
            return None
        found = (frozenset(str(g) for g in entry.verdict.get("groups", ())), checked_at)
        self._user_groups.put(user_id, found, checked_at + ttl)
        return found

    def _remember_groups(self, user_id: str, groups: frozenset[str], checked_at: float) -> None:
        until = checked_at + self._settings.groups_cache_seconds
        self._user_groups.put(user_id, (groups, checked_at), until)
        TokenCacheEntry(
            GROUPS_KEY_PREFIX + user_id,
            verdict={"user_id": user_id, "groups": sorted(groups), "checked_at": checked_at},
            expires_at=_utc(checked_at + self._settings.groups_cache_seconds),
        ).save()

    # -- Globus -----------------------------------------------------------------------
    @property
    def client(self) -> globus_sdk.ConfidentialAppAuthClient:
        import globus_sdk

        if self._client is None:
            self._client = globus_sdk.ConfidentialAppAuthClient(
                self._settings.globus_client_id,
                self._settings.globus_client_secret.get_secret_value(),
                retry_config=self._retry_config(),
                transport=self._transport(),
            )
        return self._client

    def _retry_config(self) -> RetryConfig:
        from globus_sdk.transport import RetryConfig

        config = RetryConfig(max_retries=self._settings.globus_retries, max_sleep=1.0)
        # Registered before the SDK's own checks, so it decides first.
        config.checks.register_check(_no_retry_after_timeout)
        return config

    def _transport(self) -> RequestsTransport:
        """An HTTP transport whose every call gives up after the connect and read timeouts."""
        from globus_sdk.transport import RequestsTransport

        transport = RequestsTransport()
        # `requests` takes a (connect, read) pair; the SDK hands its value straight to it.
        timeouts = (
            self._settings.globus_connect_timeout_seconds,
            self._settings.globus_read_timeout_seconds,
        )
        transport.http_timeout = cast(float, timeouts)
        return transport

    def _introspect_and_cache(self, token: str, key: str) -> Caller:
        data = self._introspect(token)  # an outage raises here: nothing is cached
        try:
            caller = self._caller_from_introspection(data)
        except AuthenticationError as error:
            raise self._refuse(key, error) from None
        caller = self._with_groups(caller, token)
        self._remember(key, caller)
        return caller

    def _introspect(self, token: str) -> dict[str, Any]:
        import globus_sdk

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
            if _is_outage(error):
                _outage("Globus Auth", error.http_status)
            # 400/401 here mean Globus refused the gateway's own client credentials.
            raise GatewayError(
                f"The gateway could not check your token: Globus Auth refused the gateway's "
                f"own credentials (HTTP {error.http_status}). Tell the gateway's operator."
            ) from None
        except globus_sdk.NetworkError:
            _outage("Globus Auth", None)
        return dict(response.data)

    def _caller_from_introspection(self, data: dict[str, Any]) -> Caller:
        s = self._settings
        if not data.get("active"):
            raise AuthenticationError(
                "The access token is inactive or expired. Get a new one with `first-auth token`."
            )
        now = time.time()
        exp = float(data.get("exp", 0))
        if exp + s.clock_skew_seconds < now:
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
        sub = str(data.get("sub"))
        identity = _session_identity(data)
        username = str(identity.get("username") or data.get("username") or "")
        domain = username.rpartition("@")[2].lower()
        service_account = domain == CLIENT_IDENTITY_DOMAIN and sub in set(s.service_accounts)
        if domain == CLIENT_IDENTITY_DOMAIN and not service_account and s.allowed_domains:
            raise AuthenticationError(
                f"This token belongs to the Globus client identity {sub}, which is not a "
                "service account of this gateway. Ask the gateway's operator to add it to "
                "FIRST_SERVICE_ACCOUNTS, or use a token of a person's identity."
            )
        allowed_domains = {d.lower() for d in s.allowed_domains}
        if not service_account and allowed_domains and domain not in allowed_domains:
            raise AuthenticationError(
                f"Your Globus session was authenticated through {domain or 'an unknown provider'}, "
                "which this gateway does not accept. Log out of Globus and sign in with an "
                f"identity from one of: {', '.join(s.allowed_domains)}."
            )
        return Caller(
            user_id=sub,
            username=username,
            name=str(identity.get("name") or data.get("name") or ""),
            email=str(identity.get("email") or data.get("email") or ""),
            idp_domain=domain,
            idp_name=str(
                identity.get("identity_provider_display_name")
                or ("Globus Auth (client identity)" if service_account else "")
            ),
            token_expires_at=exp,
            is_service_account=service_account,
            verdict_expires_at=min(now + s.token_cache_seconds, exp),
        )

    def _with_groups(self, caller: Caller, token: str) -> Caller:
        """The caller with the user's groups: from the per-user cache, else from Groups."""
        cached = self._cached_groups(caller.user_id)
        if cached is None:
            groups, checked_at = self._groups_from_globus(token), time.time()
            self._remember_groups(caller.user_id, groups, checked_at)
        else:
            groups, checked_at = cached
        return dataclasses.replace(caller, groups=groups, groups_checked_at=checked_at)

    def _groups_from_globus(self, token: str) -> frozenset[str]:
        import globus_sdk

        relogin = (
            "Could not read your Globus group memberships; log in again with `first-auth login`."
        )
        try:
            tokens = self.client.oauth2_get_dependent_tokens(token).by_resource_server
            groups_token = tokens[GROUPS_RESOURCE_SERVER]["access_token"]
            groups_client = globus_sdk.GroupsClient(
                authorizer=globus_sdk.AccessTokenAuthorizer(groups_token),
                retry_config=self._retry_config(),
                transport=self._transport(),
            )
            memberships = groups_client.get_my_groups()
        except globus_sdk.GlobusAPIError as error:
            if _is_outage(error):
                _outage("Globus Groups", error.http_status)
            raise AuthenticationError(relogin) from None
        except globus_sdk.NetworkError:
            _outage("Globus Groups", None)
        except KeyError:
            raise AuthenticationError(relogin) from None
        return frozenset(str(group["id"]) for group in memberships)


def domain_groups(domain: str) -> list[str]:
    """The groups a user signed in through `domain` must be in (none configured: [])."""
    for configured, groups in get_settings().domain_groups.items():
        if configured.lower() == domain.lower():
            return list(groups)
    return []


def _no_retry_after_timeout(context: RetryContext) -> RetryCheckResult:
    """A call that timed out is not tried again: a Globus that hangs would hang again, and
    the caller would wait `globus_retries` times the timeout for the same 503."""
    from globus_sdk.exc import GlobusTimeoutError, convert_request_exception
    from globus_sdk.transport import RetryCheckResult

    failure = context.exception  # what `requests` raised, which the SDK classifies for us
    timed_out = failure is not None and isinstance(
        convert_request_exception(cast(Any, failure)), GlobusTimeoutError
    )
    if timed_out:
        return RetryCheckResult.do_not_retry
    return RetryCheckResult.no_decision


def _is_outage(error: globus_sdk.GlobusAPIError) -> bool:
    return error.http_status >= 500 or error.http_status == 429


def _outage(service: str, status: int | None) -> NoReturn:
    what = f"HTTP {status}" if status is not None else "no answer"
    raise ServiceUnavailableError(
        f"{service} is not answering right now ({what}), so your token could not be "
        "checked. This is not a problem with your token: retry in a few seconds.",
        code="globus_unavailable",
        headers={"Retry-After": _OUTAGE_RETRY_AFTER},
    ) from None


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
    """The process's Authenticator, made once (its caches live as long as the process)."""
    global _authenticator
    if _authenticator is None:
        _authenticator = Authenticator()
    return _authenticator
