"""Shared test set-up.

Unit tests import `first_core` in this process against in-process moto (`mock_aws`); the
settings object reads the environment once, so it is fixed here before anything imports it.
Contract tests start the real local stack in a child process and talk to it over HTTP.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The reference FIRST gateway's request fixtures, used by path (never copied).
FIRST_FIXTURES = PROJECT_ROOT.parent / "shared" / "conformance" / "first-fixtures"
CALLBACK_SECRET = "test-callback-secret-0123456789abcdef"

os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCOUNT_ID_ENDPOINT_MODE": "disabled",
        "FIRST_TABLE_PREFIX": "unit-",
        "FIRST_CALLBACK_SECRET": CALLBACK_SECRET,
    }
)
os.environ.pop("FIRST_AWS_ENDPOINT_URL", None)
