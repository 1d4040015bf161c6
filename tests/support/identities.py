"""Callers as the core sees them once `first_core.auth` has established who they are."""

from __future__ import annotations

from dataclasses import replace

from first_core.auth import Caller

GROUP_A = "group-a"
GROUP_B = "group-b"

# Alice below the routing layer (no group needed there): records, results, batches, files.
CALLER = Caller(
    user_id="alice-id",
    username="alice@anl.gov",
    name="Alice",
    email="alice@anl.gov",
    idp_domain="anl.gov",
    idp_name="Argonne",
)
# Alice as routing sees her: in GROUP_A.
ALICE = replace(CALLER, groups=frozenset({GROUP_A}))
BOB = Caller(
    user_id="bob-id",
    username="bob@uchicago.edu",
    name="Bob",
    email="bob@uchicago.edu",
    idp_domain="uchicago.edu",
    idp_name="UChicago",
)
