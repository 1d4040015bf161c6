"""Who the stand-in knows: dev users, groups, the gateway's and other clients, scopes and
resource servers. Every id is stable across restarts."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

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

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
DEPENDENT_TOKEN_GRANT = "urn:globus:auth:grant_type:dependent_token"

AUTH_RESOURCE_SERVER = "auth.globus.org"
# Users' native apps may log in only with these client ids (Globus checks its registrations).
NATIVE_CLIENT_IDS = frozenset({DEV_NATIVE_CLIENT_ID})


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
