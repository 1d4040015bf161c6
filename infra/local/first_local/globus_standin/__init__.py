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

from first_local.globus_standin.app import create_app
from first_local.globus_standin.identities import (
    ADMIN_GROUP_ID,
    ALLOWED_GROUP_ID,
    AUTH_RESOURCE_SERVER,
    CLIENT_IDENTITY_DOMAIN,
    COMPUTE_RESOURCE_SERVER,
    COMPUTE_SCOPE,
    CONFIDENTIAL_CLIENTS,
    DEPENDENT_TOKEN_GRANT,
    DEV_CLIENT_ID,
    DEV_CLIENT_SECRET,
    DEV_GATEWAY_SCOPE,
    DEV_IDENTITIES,
    DEV_NATIVE_CLIENT_ID,
    DEV_SERVICE_CLIENT_ID,
    DEV_SERVICE_CLIENT_SECRET,
    GROUPS_RESOURCE_SERVER,
    GROUPS_SCOPE,
    NATIVE_CLIENT_IDS,
    DevIdentity,
)
from first_local.globus_standin.tokens import (
    client_token_claims,
    mint_client_token,
    mint_token,
)

__all__ = [
    "ADMIN_GROUP_ID",
    "ALLOWED_GROUP_ID",
    "AUTH_RESOURCE_SERVER",
    "CLIENT_IDENTITY_DOMAIN",
    "COMPUTE_RESOURCE_SERVER",
    "COMPUTE_SCOPE",
    "CONFIDENTIAL_CLIENTS",
    "DEPENDENT_TOKEN_GRANT",
    "DEV_CLIENT_ID",
    "DEV_CLIENT_SECRET",
    "DEV_GATEWAY_SCOPE",
    "DEV_IDENTITIES",
    "DEV_NATIVE_CLIENT_ID",
    "DEV_SERVICE_CLIENT_ID",
    "DEV_SERVICE_CLIENT_SECRET",
    "GROUPS_RESOURCE_SERVER",
    "GROUPS_SCOPE",
    "NATIVE_CLIENT_IDS",
    "DevIdentity",
    "client_token_claims",
    "create_app",
    "mint_client_token",
    "mint_token",
]
