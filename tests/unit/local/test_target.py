"""Which gateway operator commands act on (first_local.target), and how they refuse.

The resolution logic in process; the installed `first-gateway` as a subprocess for what a user
sees: exit status 2, one line, no traceback. The running stack is faked by a state file naming
this process (alive) and a small HTTP server (answering).
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import first_auth.cli
from first_local.stack import free_port
from first_local.target import (
    AWS_VARIABLES_DROPPED_LOCALLY,
    TargetError,
    aws_target,
    default_state_path,
    local_target,
    resolve,
)

FIRST_GATEWAY = str(Path(sys.executable).with_name("first-gateway"))


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[str]:
    """Something answering HTTP where a stack's gateway would."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _state(path: Path, base_url: str, pid: int | None = None, **extra: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "base_url": base_url,
        "aws_endpoint_url": "http://127.0.0.1:5999",
        "globus_auth_url": "http://127.0.0.1:5998/auth/",
        "pid": os.getpid() if pid is None else pid,
        **extra,
    }
    path.write_text(json.dumps(state))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------ the default state file


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"FIRST_STATE_DIR": "/tmp/s", "XDG_RUNTIME_DIR": "/run/user/1", "HOME": "/h"},
            "/tmp/s/stack.json",
        ),
        ({"XDG_RUNTIME_DIR": "/run/user/1", "HOME": "/h"}, "/run/user/1/first/stack.json"),
        # XDG says a relative value is invalid: ignored.
        ({"XDG_RUNTIME_DIR": "run", "HOME": "/h"}, "/h/.cache/first/stack.json"),
        ({"HOME": "/h"}, "/h/.cache/first/stack.json"),
    ],
)
def test_default_state_path(
    env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert default_state_path(env) == Path(expected)
    # first-auth carries its own copy (it installs without the project): the same answer.
    for name in ("FIRST_STATE_DIR", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert first_auth.cli.default_state_path() == Path(expected)


# ------------------------------------------------------------------ the local stack


def test_a_running_stack_is_found_and_real_aws_settings_are_shadowed(
    gateway: str, tmp_path: Path
) -> None:
    _state(tmp_path / "first" / "stack.json", gateway, table_prefix="first-local-")
    real = {
        "XDG_RUNTIME_DIR": str(tmp_path),
        "AWS_ACCESS_KEY_ID": "AKIAREALREALREAL",
        "AWS_SECRET_ACCESS_KEY": "real-secret",
        "AWS_SESSION_TOKEN": "real-session",
        "AWS_PROFILE": "production",
        "AWS_ENDPOINT_URL": "https://dynamodb.us-west-2.amazonaws.com",
        "FIRST_AWS_ENDPOINT_URL": "http://elsewhere:1",
    }
    target = local_target(None, real)
    assert target.description == f"the local stack at {gateway}"
    environ = dict(real)
    target.apply(environ)
    assert environ["FIRST_AWS_ENDPOINT_URL"] == "http://127.0.0.1:5999"
    assert environ["FIRST_STAGE"] == "local"
    assert environ["FIRST_TABLE_PREFIX"] == "first-local-"
    assert (environ["AWS_ACCESS_KEY_ID"], environ["AWS_SECRET_ACCESS_KEY"]) == ("testing",) * 2
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        assert name in AWS_VARIABLES_DROPPED_LOCALLY
        assert name not in environ


def test_no_state_file_names_both_ways_out(tmp_path: Path) -> None:
    with pytest.raises(TargetError) as refused:
        local_target(None, {"HOME": str(tmp_path)})
    message = str(refused.value)
    assert str(tmp_path / ".cache" / "first" / "stack.json") in message
    assert "first-gateway dev" in message and "--aws" in message
    assert "\n" not in message


def test_a_stack_that_stopped_is_not_acted_on(gateway: str, tmp_path: Path) -> None:
    state = _state(tmp_path / "stack.json", gateway, pid=_dead_pid())
    with pytest.raises(TargetError, match="is not running"):
        local_target(state)


def test_a_stack_that_does_not_answer_is_not_acted_on(tmp_path: Path) -> None:
    state = _state(tmp_path / "stack.json", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TargetError, match="does not answer"):
        local_target(state)


@pytest.mark.parametrize(
    ("content", "says"),
    [("{not json", "not JSON"), ("[1, 2]", "not a JSON object"), ('{"pid": 1}', "no base_url")],
)
def test_a_state_file_that_is_not_one(content: str, says: str, tmp_path: Path) -> None:
    path = tmp_path / "stack.json"
    path.write_text(content)
    with pytest.raises(TargetError, match=says):
        local_target(path)


# ------------------------------------------------------------------ AWS, only when told


def test_aws_names_the_stage_tables_as_the_template_does() -> None:
    target = aws_target("dev", None, {"AWS_DEFAULT_REGION": "us-west-2"})
    assert target.description == "AWS stage dev (us-west-2)"
    environ = {"FIRST_AWS_ENDPOINT_URL": "http://127.0.0.1:5999"}
    target.apply(environ)
    assert environ == {
        "FIRST_STAGE": "dev",
        "FIRST_AWS_REGION": "us-west-2",
        "FIRST_TABLE_PREFIX": "first-dev-",
    }
    assert aws_target("prod", "eu-west-1", {}).env["FIRST_AWS_REGION"] == "eu-west-1"


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"aws": True}, "--aws needs --stage"),
        ({"aws": True, "stage": "Dev_1"}, "bad stage"),
        ({"aws": False, "stage": "dev"}, "add --aws"),
        ({"aws": True, "stage": "dev", "state_file": Path("s.json")}, "pick one"),
    ],
)
def test_ambiguous_or_bad_choices_are_refused(options: dict[str, Any], says: str) -> None:
    with pytest.raises(TargetError, match=says):
        resolve(**options, environ={"AWS_DEFAULT_REGION": "us-east-1"})


# ------------------------------------------------------------------ the command, as a user runs it


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8", **extra}


def _assert_one_line_refusal(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_maintenance_with_no_running_stack_refuses_in_one_line(tmp_path: Path) -> None:
    # Real-looking AWS credentials in the environment must not make it act on AWS.
    env = _clean_env(
        tmp_path, AWS_ACCESS_KEY_ID="AKIAREALREALREAL", AWS_SECRET_ACCESS_KEY="real-secret"
    )
    result = subprocess.run(
        [FIRST_GATEWAY, "registry", "maintenance", "polaris", "on"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    line = _assert_one_line_refusal(result)
    assert line.startswith("first-gateway: no running local stack")
    assert "first-gateway dev" in line and "--aws" in line


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (["--aws"], "--aws needs --stage"),
        (["--stage", "dev"], "add --aws"),
        (["--state-file", "nowhere.json"], "no state file at nowhere.json"),
    ],
)
def test_other_mistakes_refuse_in_one_line(arguments: list[str], says: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [FIRST_GATEWAY, "registry", "show", *arguments],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path),
        cwd=tmp_path,
        timeout=60,
    )
    assert says in _assert_one_line_refusal(result)


def test_aws_without_credentials_refuses_in_one_line(tmp_path: Path) -> None:
    env = _clean_env(tmp_path, AWS_DEFAULT_REGION="us-east-1")
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    # No instance metadata to look for credentials in.
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    result = subprocess.run(
        [FIRST_GATEWAY, "registry", "show", "--aws", "--stage", "dev"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "no AWS credentials found" in _assert_one_line_refusal(result)


@pytest.mark.parametrize("expired", [False, True])
def test_token_prints_only_the_token(expired: bool, tmp_path: Path) -> None:
    from first_local.globus_standin.tokens import _verify

    env = _clean_env(tmp_path)
    if "FIRST_DEV_TOKEN_SECRET" in os.environ:  # the tokens this process would verify
        env["FIRST_DEV_TOKEN_SECRET"] = os.environ["FIRST_DEV_TOKEN_SECRET"]
    result = subprocess.run(
        [FIRST_GATEWAY, "token", "--user", "bob", *(["--expired"] if expired else [])],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    [token] = result.stdout.splitlines()
    assert result.stdout == token + "\n"
    claims = _verify(token, None)
    if expired:
        assert claims is None and token.startswith("firstdev.")
    else:
        assert claims is not None and claims["user"] == "bob"


# ------------------------------------------------------------------ the stack's side


STATE_KEYS = {
    "base_url",
    "aws_endpoint_url",
    "globus_auth_url",
    "globus_groups_url",
    "standin_calls_url",
    "globus_compute_url",
    "compute_client_id",
    "compute_client_secret",
    "compute_endpoints",
    "compute_api_limit",
    "backend_url",
    "direct_url",
    "cluster_fs",
    "table_prefix",
    "pid",
}


def test_the_stack_writes_its_state_to_the_default_place_and_removes_only_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from first_local.stack import LocalStack, StackOptions

    monkeypatch.setenv("FIRST_STATE_DIR", str(tmp_path / "default"))
    given = tmp_path / "given" / "state.json"
    stack = LocalStack(StackOptions(state_file=given, cluster_fs=tmp_path / "fs"))
    stack.write_state()
    default = tmp_path / "default" / "stack.json"
    for path in (given, default):
        state = json.loads(path.read_text())
        assert set(state) == STATE_KEYS
        assert state["pid"] == os.getpid() and state["base_url"] == stack.base_url
        assert path.stat().st_mode & 0o777 == 0o600  # it holds the dev client's secret
    stack.remove_state()
    assert not default.exists() and given.exists()
    # A newer stack took the default file over: stopping this one leaves it alone.
    stack.write_state()
    default.write_text(json.dumps({**json.loads(default.read_text()), "pid": os.getpid() + 1}))
    stack.remove_state()
    assert default.exists()


def test_a_joining_gateway_leaves_the_default_state_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from first_local.stack import LocalStack, StackOptions

    monkeypatch.setenv("FIRST_STATE_DIR", str(tmp_path / "default"))
    first = _state(tmp_path / "first.json", "http://127.0.0.1:8000")
    state = json.loads(first.read_text())
    state |= {
        "globus_compute_url": "http://127.0.0.1:5997",
        "backend_url": "http://127.0.0.1:5996/v1",
        "cluster_fs": str(tmp_path),
        "compute_endpoints": {},
    }
    first.write_text(json.dumps(state))
    joined = tmp_path / "second.json"
    LocalStack(StackOptions(port=8001, join=first, state_file=joined)).write_state()
    assert joined.exists() and not (tmp_path / "default" / "stack.json").exists()


def test_failures_of_aws_itself_are_one_line() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError
    from pynamodb.exceptions import ScanError

    from first_core.settings import get_settings
    from first_local.cli import _aws_failure

    missing = ClientError(
        {"Error": {"Code": "ResourceNotFoundException", "Message": "Requested resource not found"}},
        "Scan",
    )
    status, message = _aws_failure(missing) or (0, "")
    prefix = get_settings().table_prefix
    assert status == 2 and message.startswith(f"no table {prefix}registry in ")
    refused = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "Scan")
    assert _aws_failure(refused) == (1, "AWS call failed: AccessDeniedException: no")
    unreachable = EndpointConnectionError(endpoint_url="http://127.0.0.1:1/")
    assert _aws_failure(unreachable) == (
        1,
        'AWS call failed: Could not connect to the endpoint URL: "http://127.0.0.1:1/"',
    )
    wrapped = ScanError("Failed to scan table: Could not connect", cause=unreachable)
    assert _aws_failure(wrapped) == (1, "AWS call failed: Failed to scan table: Could not connect")
    # Anything else is a bug: no message, so the traceback stays.
    assert _aws_failure(KeyError("x")) is None
