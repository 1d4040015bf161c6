"""What a request presents before anything is asked of Globus: its one `Authorization` header,
the bearer token in it (checked for shape), and the client address it comes from.

**One header.** The proxy (Starlette) and the control plane (Chalice) read headers differently
(the first value, the last); a request with more than one `Authorization` header is refused
400 on both, so no two readings of one request can disagree.

**The token's shape.** A bearer token is RFC 6750's `b64token` (letters, digits and
`-._~+/`, then `=` padding) of `MIN_TOKEN_CHARS` to `MAX_TOKEN_CHARS` characters. Globus access
tokens are opaque alphanumeric strings of roughly 40 to 90 characters; the local stand-in's
(`firstdev.<payload>.<mac>`) are about 500; the bounds leave room on both sides (and for a
JWT-shaped token, should Globus issue them). Anything else is a 401 without a call to Globus.

**The client address** (the key of the failed-authentication limit,
first_core.auth_failures) is the source address API Gateway saw, `requestContext.identity.
sourceIp`: Chalice reads it from its event; the proxy from the `x-amzn-request-context` header
Lambda Web Adapter sets from the same event (replacing any a client sends; the local server
does the same). Without that context (the proxy run bare), the TCP peer. `X-Forwarded-For` is
never read: its first entries are whatever the client wrote.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from first_core.errors import AuthenticationError, InvalidRequestError

MIN_TOKEN_CHARS = 20
MAX_TOKEN_CHARS = 2048
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# An IPv6 client holds a whole /64 (one customer's network): it counts as one address.
_IPV6_CLIENT_PREFIX = 64


def one_authorization(values: Iterable[str]) -> str | None:
    """The request's one `Authorization` header (None if it has none); 400 if it has several."""
    found = list(values)
    if len(found) > 1:
        raise InvalidRequestError(
            "The request has more than one Authorization header. Send exactly one: "
            "Authorization: Bearer <Globus access token>.",
            param="Authorization",
            code="duplicate_authorization_header",
        )
    return found[0] if found else None


def authorization_or_api_key(authorization: str | None, api_keys: Iterable[str]) -> str | None:
    """The Authorization header, else Anthropic's `x-api-key` as a bearer token (the Messages
    route: its SDK sends a key there). Several `x-api-key` headers are a 400, as several
    Authorization headers are."""
    if authorization is not None:
        return authorization
    keys = list(api_keys)
    if len(keys) > 1:
        raise InvalidRequestError(
            "The request has more than one x-api-key header. Send exactly one.",
            param="x-api-key",
            code="duplicate_authorization_header",
        )
    return f"Bearer {keys[0]}" if keys else None


def presents_bearer_token(authorization: str | None) -> bool:
    """Whether the header offers a bearer token at all (well-formed or not): what counts as
    a failed authentication when it is refused. No header, or another scheme, does not."""
    if not authorization:
        return False
    scheme = authorization.split(None, 1)[0] if authorization.strip() else ""
    return scheme.lower() == "bearer"


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer` header; 401 if there is none or it is malformed."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise AuthenticationError(
            "Missing bearer token. Send a Globus access token as the API key "
            "(Authorization: Bearer <token>); get one with `first-auth token`."
        )
    token = authorization[7:].strip()
    if not well_formed(token):
        raise AuthenticationError(
            "The bearer token is empty or malformed: it is not a Globus access token. "
            "Get one with `first-auth token`."
        )
    return token


def well_formed(token: str) -> bool:
    """Whether `token` has the shape of an access token (see the module's docstring)."""
    return MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS and bool(_B64TOKEN.fullmatch(token))


def source_address(request_context: Mapping[str, Any] | str | None, peer: str | None) -> str | None:
    """The client's address: API Gateway's `identity.sourceIp` from the request context (a
    mapping, or the JSON of Lambda Web Adapter's header), else the TCP peer."""
    context: Any = request_context
    if isinstance(context, str):
        try:
            context = json.loads(context)
        except ValueError:
            context = None
    identity = context.get("identity") if isinstance(context, Mapping) else None
    source = identity.get("sourceIp") if isinstance(identity, Mapping) else None
    if isinstance(source, str) and source:
        return source
    return peer or None


def address_key(address: str) -> str:
    """How an address is counted: an IPv4 address as it is, an IPv6 one by its /64 network,
    anything unparsable as a fixed-length digest of it (so a key stays short and safe)."""
    try:
        parsed = ipaddress.ip_address(address.strip())
    except ValueError:
        return "unparsed-" + hashlib.sha256(address.encode("utf-8", "replace")).hexdigest()[:32]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/{_IPV6_CLIENT_PREFIX}", strict=False))
    return str(parsed)
