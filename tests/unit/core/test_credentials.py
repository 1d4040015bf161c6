"""What a request presents (first_core.credentials): one Authorization header, the shape of a
bearer token, the client's address; and the bounded memory the caches use (first_core.lru)."""

from __future__ import annotations

import json

import pytest

from first_core.credentials import (
    MAX_TOKEN_CHARS,
    address_key,
    bearer_token,
    one_authorization,
    presents_bearer_token,
    source_address,
    well_formed,
)
from first_core.errors import AuthenticationError, InvalidRequestError
from first_core.lru import ExpiringLRU
from first_local.globus_standin import DEV_IDENTITIES, mint_client_token, mint_token


def test_more_than_one_authorization_header_is_a_400_in_openais_shape() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        one_authorization(["Bearer a" * 5, "Bearer b" * 5])

    assert refused.value.status == 400
    body = refused.value.to_body()["error"]
    assert body["type"] == "invalid_request_error"
    assert body["code"] == "duplicate_authorization_header"
    assert "more than one Authorization header" in body["message"]


def test_one_or_no_authorization_header_is_read_as_it_is() -> None:
    assert one_authorization(["Bearer x"]) == "Bearer x"
    assert one_authorization([]) is None


@pytest.mark.parametrize("user", sorted(DEV_IDENTITIES))
def test_the_tokens_the_standin_mints_are_well_formed(user: str) -> None:
    assert well_formed(mint_token(user))
    assert well_formed(mint_token(user, expired=True))
    assert well_formed(mint_client_token())


@pytest.mark.parametrize(
    "token",
    [
        # opaque alphanumeric, as Globus Auth issues them (~40-90 characters)
        "AgQ1bJx5nWKDNKy6dEmR0bdWqkVjoPYJ7pmnz1jDlM9KqdXK3WUcgEe9G4zeBmYeDpl2ZrJXVm3lgCzJ5a",
        "Ag8yNmVkMzQ5YjNmYWE0YzE5YjJiNzFlNGI3YTkzMGVkMjM",
        # a JWT-shaped token, base64 with padding, RFC 6750's other characters
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
        "abcdefghij+/~-._0123456789==",
    ],
)
def test_real_globus_shaped_tokens_are_well_formed(token: str) -> None:
    assert well_formed(token)
    assert bearer_token(f"Bearer {token}") == token


@pytest.mark.parametrize(
    "token",
    [
        "",
        "x" * 19,
        "x" * (MAX_TOKEN_CHARS + 1),
        "two words-0123456789-0123456789",
        "unicode-\u00e9\u00e9-0123456789abcdef",
        "nul\x00inside-0123456789abcdef",
        "=padding-only-in-front-0123",
        "ends-with-padding-then-more=x",
        "<script>alert(1)</script>xx",
    ],
)
def test_anything_else_is_malformed(token: str) -> None:
    assert not well_formed(token)
    with pytest.raises(AuthenticationError) as refused:
        bearer_token(f"Bearer {token}")
    assert refused.value.status == 401


@pytest.mark.parametrize(
    ("header", "presented"),
    [
        (None, False),
        ("", False),
        ("   ", False),
        ("Basic dXNlcjpwYXNz", False),
        ("Bearer", True),
        ("bearer garbage", True),
        ("BEARER " + "x" * 30, True),
    ],
)
def test_what_counts_as_presenting_a_bearer_token(header: str | None, presented: bool) -> None:
    assert presents_bearer_token(header) is presented


def test_the_client_address_is_api_gateways_source_ip_else_the_peer() -> None:
    context = {"identity": {"sourceIp": "198.51.100.4"}, "requestId": "x"}

    assert source_address(context, "127.0.0.1") == "198.51.100.4"  # Chalice's event
    assert source_address(json.dumps(context), "127.0.0.1") == "198.51.100.4"  # LWA's header
    assert source_address(None, "192.0.2.1") == "192.0.2.1"
    assert source_address("not json", "192.0.2.1") == "192.0.2.1"
    assert source_address("null", "192.0.2.1") == "192.0.2.1"
    assert source_address({"identity": {"sourceIp": ""}}, "192.0.2.1") == "192.0.2.1"
    assert source_address(None, None) is None


def test_addresses_are_counted_per_ipv4_address_and_per_ipv6_64() -> None:
    assert address_key("198.51.100.4") == "198.51.100.4"
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:198.51.100.4") == "198.51.100.4"
    odd = address_key("not-an-address#with#hashes")
    assert odd.startswith("unparsed-") and "#" not in odd and len(odd) < 50


def test_the_lru_drops_the_least_recently_used_past_its_size() -> None:
    cache: ExpiringLRU[int] = ExpiringLRU(3)
    for i in range(3):
        cache.put(str(i), i, until=100.0)
    assert cache.get("0", now=1.0) == 0  # 0 is now the most recent
    cache.put("3", 3, until=100.0)

    assert len(cache) == 3
    assert cache.get("1", now=1.0) is None  # the least recently used went
    assert [cache.get(k, now=1.0) for k in ("0", "2", "3")] == [0, 2, 3]


def test_the_lru_forgets_an_entry_at_its_instant() -> None:
    cache: ExpiringLRU[str] = ExpiringLRU(10)
    cache.put("k", "v", until=50.0)

    assert cache.get("k", now=49.9) == "v"
    assert cache.get("k", now=50.0) is None
    assert len(cache) == 0
