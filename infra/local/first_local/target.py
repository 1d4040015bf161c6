"""Which gateway an operator command acts on: the running local stack, or an AWS stage.

`first-gateway dev` writes its state file (the addresses of every piece) to a default place as
well as to `--state-file`, and removes it when it stops. Operator commands (`first-gateway
registry ...`) find the stack there and act on it with moto's address and dummy keys they set
themselves, whatever AWS variables are exported; they act on AWS only when told (`--aws`, with
`--stage` naming the stage's tables as template.yaml does). Every way this can go wrong is a
`TargetError`: a one-line message, exit status 2, no traceback.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Overrides the directory of the default state file (tests and parallel stacks set it).
STATE_DIR_VARIABLE = "FIRST_STATE_DIR"
STATE_FILE_NAME = "stack.json"
# template.yaml's `Stage` parameter (AllowedPattern) and its table names, `first-<stage>-<table>`.
STAGE_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,11}$")
LOCAL_REGION = "us-east-1"
# Real credentials and addresses that must not reach a command acting on the local stack: with
# them, a forgotten `export` would point a command meant for moto at a real account.
AWS_VARIABLES_DROPPED_LOCALLY = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_DYNAMODB",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_SQS",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


class TargetError(Exception):
    """A user mistake in choosing what to act on: reported in one line, exit status 2."""


def default_state_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where `first-gateway dev` writes its state by default: `$FIRST_STATE_DIR/stack.json`,
    else `$XDG_RUNTIME_DIR/first/stack.json`, else `~/.cache/first/stack.json`."""
    env = os.environ if environ is None else environ
    override = env.get(STATE_DIR_VARIABLE, "")
    if override:
        return Path(override) / STATE_FILE_NAME
    runtime = env.get("XDG_RUNTIME_DIR", "")
    # XDG: a relative value is invalid and ignored.
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "first" / STATE_FILE_NAME
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".cache" / "first" / STATE_FILE_NAME


def read_state(path: Path) -> dict[str, Any]:
    """A state file's content; `TargetError` if it cannot be read or is not one."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise TargetError(f"no state file at {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.__class__.__name__
        raise TargetError(f"cannot read the state file {path}: {reason}") from None
    except ValueError:
        raise TargetError(f"{path} is not a stack state file (not JSON)") from None
    if not isinstance(state, dict):
        raise TargetError(f"{path} is not a stack state file (not a JSON object)")
    missing = [k for k in ("base_url", "aws_endpoint_url", "pid") if k not in state]
    if missing:
        raise TargetError(f"{path} is not a stack state file (no {', '.join(missing)})")
    return state


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def answers(base_url: str, timeout: float = 3.0) -> bool:
    """Whether the gateway at `base_url` answers HTTP at all (any status counts)."""
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def running_stack(path: Path) -> dict[str, Any]:
    """The state of the stack that wrote `path`, if it still runs and answers."""
    state = read_state(path)
    try:
        pid = int(state["pid"])
    except (TypeError, ValueError):
        raise TargetError(f"{path} is not a stack state file (pid {state['pid']!r})") from None
    if not pid_alive(pid):
        raise TargetError(f"the local stack that wrote {path} is not running (pid {pid} is gone)")
    if not answers(str(state["base_url"])):
        raise TargetError(f"the local stack in {path} does not answer at {state['base_url']}")
    return state


@dataclass(frozen=True)
class Target:
    """Where a command acts: its description for the user, and the environment it needs (set
    before `first_core` is imported: its settings are read once)."""

    description: str
    env: dict[str, str]
    unset: tuple[str, ...] = field(default=())

    def apply(self, environ: Any = None) -> None:
        target = os.environ if environ is None else environ
        for name in self.unset:
            target.pop(name, None)
        target.update(self.env)


def local_target(state_file: Path | None, environ: Mapping[str, str] | None = None) -> Target:
    """The running local stack of `state_file`, or of the default state file."""
    env = os.environ if environ is None else environ
    path = state_file or default_state_path(env)
    try:
        state = running_stack(path)
    except TargetError as error:
        if state_file is not None:
            raise
        raise TargetError(
            f"no running local stack ({error}): start one with `first-gateway dev`, or pass "
            "--aws --stage STAGE to act on a deployment"
        ) from None
    variables = {
        "FIRST_STAGE": "local",
        "FIRST_AWS_ENDPOINT_URL": str(state["aws_endpoint_url"]),
        "FIRST_AWS_REGION": LOCAL_REGION,
        "FIRST_TABLE_PREFIX": str(state.get("table_prefix") or "first-local-"),
        # moto takes any keys; these shadow whatever credentials the environment holds.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": LOCAL_REGION,
        "AWS_REGION": LOCAL_REGION,
    }
    return Target(
        f"the local stack at {state['base_url']}", variables, AWS_VARIABLES_DROPPED_LOCALLY
    )


def aws_target(
    stage: str | None, region: str | None, environ: Mapping[str, str] | None = None
) -> Target:
    """A deployed stage: its tables as template.yaml names them, in `region` (or the AWS
    configuration's), with the caller's own AWS credentials."""
    env = os.environ if environ is None else environ
    if not stage:
        raise TargetError("--aws needs --stage STAGE (dev, prod, ...: infra/samconfig.toml)")
    if not STAGE_PATTERN.match(stage):
        raise TargetError(f"bad stage {stage!r}: lowercase letters and digits, at most 12")
    region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or _config_region()
    if not region:
        raise TargetError("no AWS region: pass --region, or set one with `aws configure`")
    variables = {
        "FIRST_STAGE": stage,
        "FIRST_AWS_REGION": region,
        "FIRST_TABLE_PREFIX": stage_table_prefix(stage),
    }
    return Target(f"AWS stage {stage} ({region})", variables, ("FIRST_AWS_ENDPOINT_URL",))


def stage_table_prefix(stage: str) -> str:
    """The table prefix template.yaml gives a stage's functions (`first-${Stage}-`)."""
    from first_local.provision import TEMPLATE, load_template, table_prefix_expression

    return table_prefix_expression(load_template(TEMPLATE)).replace("${Stage}", stage)


def _config_region() -> str | None:
    import boto3

    return boto3.session.Session().region_name


def check_aws_credentials() -> None:
    """Refuse early, in one line, when boto3 finds no credentials at all."""
    import boto3

    if boto3.session.Session().get_credentials() is None:
        raise TargetError(
            "no AWS credentials found (aws configure, AWS_PROFILE, or AWS_ACCESS_KEY_ID)"
        )


def resolve(
    *,
    aws: bool,
    stage: str | None = None,
    region: str | None = None,
    state_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Target:
    """The local stack unless `aws`; `--stage` without `--aws` is a mistake, not a guess."""
    if aws:
        if state_file is not None:
            raise TargetError("--aws and --state-file name two different gateways: pick one")
        return aws_target(stage, region, environ)
    if stage or region:
        raise TargetError("--stage and --region act on AWS: add --aws")
    return local_target(state_file, environ)
