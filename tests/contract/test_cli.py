"""The operator's command as a user runs it on the running local stack, with nothing exported.

`first-gateway registry maintenance polaris on|off` runs as a subprocess in a clean environment:
HOME and XDG_RUNTIME_DIR point at a temporary directory where the stack's state sits as
`first-gateway dev` writes it by default, and no AWS or FIRST variable is set. Its effect is
checked through the gateway's own API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.contract.conftest import Stack

FIRST_GATEWAY = str(Path(sys.executable).with_name("first-gateway"))


def _health(stack: Stack) -> dict[str, Any]:
    with urllib.request.urlopen(f"{stack.base_url}/health", timeout=10) as response:
        return dict(json.load(response))


def _wait_for_status(stack: Stack, cluster: str, status: str, timeout: float = 20) -> None:
    """The gateway re-reads the registry within FIRST_REGISTRY_CACHE_SECONDS."""
    deadline = time.monotonic() + timeout
    while (seen := _health(stack)["clusters"].get(cluster)) != status:
        assert time.monotonic() < deadline, f"{cluster} is {seen!r}, not {status!r}"
        time.sleep(0.5)


def _run(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FIRST_GATEWAY, "registry", *arguments],
        capture_output=True,
        text=True,
        env=env,
        cwd=env["HOME"],
        timeout=120,
    )


def test_maintenance_on_the_running_stack_with_nothing_exported(
    stack: Stack, tmp_path: Path
) -> None:
    runtime = tmp_path / "run"
    (runtime / "first").mkdir(parents=True)
    state = {k: v for k, v in stack.state.items() if k != "log"}
    (runtime / "first" / "stack.json").write_text(json.dumps(state))
    clean = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": str(runtime),
        "LANG": "C.UTF-8",
    }
    assert not {k for k in clean if k.startswith(("AWS_", "FIRST_"))}
    _wait_for_status(stack, "polaris", "online")
    try:
        on = _run(clean, "maintenance", "polaris", "on")
        assert on.returncode == 0, on.stderr
        assert on.stdout == "polaris: maintenance on\n"
        assert on.stderr == f"acting on the local stack at {stack.base_url}\n"
        _wait_for_status(stack, "polaris", "maintenance")
        # Real-looking credentials, a profile and an endpoint exported by mistake: still the
        # local stack (with them, boto3 would fail or reach AWS).
        hostile = {
            **clean,
            "AWS_ACCESS_KEY_ID": "AKIAREALREALREAL",
            "AWS_SECRET_ACCESS_KEY": "real-secret",
            "AWS_SESSION_TOKEN": "real-session",
            "AWS_PROFILE": "no-such-profile",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        }
        shown = _run(hostile, "show")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["clusters"]["polaris"]["status"] == "maintenance"
        bad = _run(clean, "maintenance", "polars", "on")
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert bad.stderr.splitlines()[-1] == (
            "first-gateway: no cluster 'polars' in the registry (clusters: direct, polaris, sophia)"
        )
        off = _run(hostile, "maintenance", "polaris", "off")
        assert off.returncode == 0, off.stderr
        _wait_for_status(stack, "polaris", "online")
    finally:
        # The session's stack is shared: polaris must serve again whatever happened here.
        _run(clean, "maintenance", "polaris", "off")
