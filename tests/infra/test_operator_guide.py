"""infra/OPERATOR.md walked end to end, every shell block run as written, in order.

The operator's shell is bash on a copy of this repository (so the guide's `cp`, `--write` and
samconfig edits touch no checkout), with:
  - AWS: a moto server of its own (AWS_ENDPOINT_URL, dummy keys), the real AWS CLI, and for the
    SAM CLI the stand-in tests/infra/fake_sam.py (translate, then create or update the stack);
  - Globus: the Auth and Compute stand-ins (GLOBUS_SDK_SERVICE_URL_AUTH/_COMPUTE) with the
    stand-in's gateway app as the operator's (`$GLOBUS_CLIENT_ID`) and native app
    (`$NATIVE_CLIENT_ID`).
What cannot run here is stood in for by a shell function of the same name, listed in STAND_INS
with the reason; the blocks themselves are run verbatim. Every block must have a check in
CHECKS (keyed by its first command), so a command added to the guide fails this test until a
test exercises it. The walk takes about a minute (four deploys into moto).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from first_core.compute import SERVICE_URL_VARIABLE
from first_local.compute_standin import ApiLimit, ComputeService
from first_local.compute_standin import create_app as create_compute_app
from first_local.globus_standin import (
    ADMIN_GROUP_ID,
    ALLOWED_GROUP_ID,
    DEV_CLIENT_ID,
    DEV_CLIENT_SECRET,
    DEV_NATIVE_CLIENT_ID,
)
from first_local.globus_standin import create_app as create_auth_app
from first_local.mock_vllm import create_app as create_mock_vllm
from first_local.provision import load_template
from first_local.stack import free_port
from tests.infra.conftest import FAKE_AWS, PROJECT_ROOT, client
from tests.support.asgi import serve

GUIDE = PROJECT_ROOT / "infra" / "OPERATOR.md"
STACK = "first-dev"
BIN = Path(sys.executable).parent

# What the walk cannot run, each replaced by a shell function of the same name (and why).
STAND_INS = {
    "globus-compute-endpoint start|list": (
        "starting an endpoint needs the Globus Compute service itself (AMQP); the Compute "
        "stand-in plays the started endpoint, and the registry keeps the example's endpoint ids"
    ),
    "first-auth login": (
        "a person opens the address in a browser: the walk fetches it (the stand-in signs alice "
        "in) and finishes with `first-auth login --start` / `--code`, the same PKCE flow"
    ),
    "infra/smoke": (
        "moto's execute-api address serves nothing: the smoke test runs against the local mock "
        "vLLM, an OpenAI-compatible server, in its place"
    ),
    "git pull": "the walk's copy of the repository is not a checkout",
}
PRELUDE = r"""
set -euo pipefail
globus-compute-endpoint() {
    case "$1" in
        start|list) echo "walk: stand-in for globus-compute-endpoint $*" ;;
        *) command globus-compute-endpoint "$@" ;;
    esac
}
first-auth() {
    if [ "$1" = login ]; then
        local url code
        url=$(command first-auth login --start)
        code=$(python -c 'import sys, httpx, urllib.parse as u
r = httpx.get(sys.argv[1] + "&user=alice", follow_redirects=False)
print(u.parse_qs(u.urlparse(r.headers["location"]).query)["code"][0])' "$url")
        command first-auth login --code "$code"
    else
        command first-auth "$@"
    fi
}
infra/smoke() { command infra/smoke "$WALK_OPENAI_URL" "${@:2}"; }
git() { echo "walk: stand-in for git $*"; }
"""


def guide_blocks(text: str | None = None) -> list[list[str]]:
    """Each ```sh block of the guide, as its commands (continuation lines joined, comments and
    blank lines dropped)."""
    text = GUIDE.read_text() if text is None else text
    blocks = []
    for body in re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M):
        commands = []
        for line in body.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#\s.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
        blocks.append(commands)
    return blocks


# ------------------------------------------------------------------ the operator's world


@dataclass
class Walk:
    root: Path  # the repository copy the operator works in
    home: Path
    env: dict[str, str]
    aws: str  # moto
    compute: ComputeService
    outputs: list[str] = field(default_factory=list)

    def run(self, commands: list[str]) -> subprocess.CompletedProcess[str]:
        # One operator's shell session: what a block exports, the next ones see.
        exported = self.home.parent / "exported.sh"
        carried = f"source {exported}\n" if exported.exists() else ""
        started = time.monotonic()
        script = PRELUDE + carried + "\n".join(commands) + f"\nexport -p > {exported}\n"
        result = subprocess.run(
            ["bash", "-c", script],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        elapsed = time.monotonic() - started
        self.outputs.append(f"$ {commands} ({elapsed:.1f} s)\n{result.stdout}{result.stderr}")
        assert result.returncode == 0, f"{commands}\n{result.stdout}\n{result.stderr}"
        return result

    def cfn(self) -> Any:
        return client("cloudformation", self.aws)

    def stack(self) -> dict[str, Any]:
        return dict(self.cfn().describe_stacks(StackName=STACK)["Stacks"][0])

    def parameters(self) -> dict[str, str]:
        return {p["ParameterKey"]: p["ParameterValue"] for p in self.stack()["Parameters"]}


def _copy_repository(target: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "build", ".aws-sam", "__pycache__", "*.egg-info", ".*_cache", ".hypothesis"
    )
    shutil.copytree(PROJECT_ROOT, target, ignore=ignore, symlinks=True)
    return target


def _moto(port: int) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(
        [sys.executable, "-m", "first_local.moto_server", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **FAKE_AWS},
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2):
                return child
        except OSError:
            if time.monotonic() > deadline or child.poll() is not None:
                child.kill()
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.1)


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    base = tmp_path_factory.mktemp("walk")
    root = _copy_repository(base / "repo")
    home = base / "home"
    home.mkdir()
    tools = base / "bin"
    tools.mkdir()
    sam = tools / "sam"
    sam.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{PROJECT_ROOT}/tests/infra/fake_sam.py" "$@"\n'
    )
    sam.chmod(0o755)
    port = free_port()
    moto = _moto(port)
    service = ComputeService(limit=ApiLimit(0, 0))
    try:
        with (
            serve(create_auth_app()) as auth,
            serve(create_compute_app(service)) as compute,
            serve(create_mock_vllm()) as openai_server,
        ):
            env = {
                "PATH": f"{tools}:{BIN}:{os.environ['PATH']}",
                "HOME": str(home),
                "LANG": "C.UTF-8",
                **FAKE_AWS,
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                # infra/deploy's Python, as the repository's .venv would be.
                "PYTHON": sys.executable,
                # What the operator knows (guide, "Prerequisites"): the stand-in's apps.
                "GLOBUS_CLIENT_ID": DEV_CLIENT_ID,
                "GLOBUS_CLIENT_SECRET": DEV_CLIENT_SECRET,
                "NATIVE_CLIENT_ID": DEV_NATIVE_CLIENT_ID,
                "NEW_GLOBUS_CLIENT_SECRET": "rotated-" + DEV_CLIENT_SECRET,
                # Where Globus is: the stand-ins, as the local stack points globus-sdk at them.
                "GLOBUS_SDK_SERVICE_URL_AUTH": f"{auth}/auth/",
                SERVICE_URL_VARIABLE: compute,
                "WALK_OPENAI_URL": f"{openai_server}/v1",
            }
            yield Walk(root, home, env, f"http://127.0.0.1:{port}", service)
    finally:
        moto.terminate()
        moto.wait(timeout=10)


# ------------------------------------------------------------------ what each block must do


def _secrets(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    secrets = client("secretsmanager", walk.aws)
    value = secrets.get_secret_value(SecretId="first/dev/globus-client-secret")
    assert value["SecretString"] == DEV_CLIENT_SECRET
    callback = secrets.get_secret_value(SecretId="first/dev/callback-secret")["SecretString"]
    assert re.fullmatch(r"[0-9a-f]{64}", callback)


def _endpoint(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    config = walk.home / ".globus_compute" / "first-llama3-8b" / "config.yaml"
    example = walk.root / "compute_funcs" / "pbs-endpoint-example.yaml"
    assert config.read_text() == example.read_text()


def _register(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    registry = yaml.safe_load((walk.root / "infra" / "registry" / "dev.yaml").read_text())
    registered = set(walk.compute.functions)
    for cluster in registry["clusters"].values():
        for endpoint in cluster["endpoints"]:
            assert set(endpoint["functions"].values()) <= registered, endpoint["functions"]
            assert {"inference", "streaming", "qstat"} <= set(endpoint["functions"])


def _edit_samconfig(walk: Walk) -> None:
    """What the operator does before deploying (guide, section 5): their apps and groups."""
    path = walk.root / "infra" / "samconfig.toml"
    text = path.read_text()
    dev, rest = text.split("[prod.build.parameters]", 1)
    dev = dev.replace(
        "00000000-0000-0000-0000-000000000000/action_all", f"{DEV_CLIENT_ID}/action_all"
    )
    dev = dev.replace(
        '"GlobusClientId=00000000-0000-0000-0000-000000000000"', f'"GlobusClientId={DEV_CLIENT_ID}"'
    )
    groups = [
        f"AllowedGroups={ALLOWED_GROUP_ID}",
        f"AdminGroups={ADMIN_GROUP_ID}",
        f"NativeClientId={DEV_NATIVE_CLIENT_ID}",
    ]
    dev = dev.replace(
        '"AllowedGroups=00000000-0000-0000-0000-000000000000"',
        ",\n    ".join(f'"{item}"' for item in groups),
    )
    assert "00000000-0000-0000-0000-000000000000" not in dev
    path.write_text(dev + "[prod.build.parameters]" + rest)


def _deployed(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    stack = walk.stack()
    assert stack["StackStatus"] in ("CREATE_COMPLETE", "UPDATE_COMPLETE")
    parameters = walk.parameters()
    # Who gets in, as the functions will read it: the group is required on dev too.
    config = client("lambda", walk.aws).get_function_configuration(FunctionName="first-dev-proxy")
    variables = config["Environment"]["Variables"]
    assert json.loads(variables["FIRST_ALLOWED_GROUPS"]) == [ALLOWED_GROUP_ID]
    assert json.loads(variables["FIRST_ADMIN_GROUPS"]) == [ADMIN_GROUP_ID]
    assert variables["FIRST_NATIVE_CLIENT_ID"] == DEV_NATIVE_CLIENT_ID
    secrets = client("secretsmanager", walk.aws)
    for name, version in (
        ("first/dev/globus-client-secret", "GlobusClientSecretVersionId"),
        ("first/dev/callback-secret", "CallbackSecretVersionId"),
    ):
        current = secrets.describe_secret(SecretId=name)["VersionIdsToStages"]
        assert "AWSCURRENT" in current[parameters[version]], (name, current)
    # infra/deploy loaded the stage's registry into the deployed table.
    rows = client("dynamodb", walk.aws).scan(TableName="first-dev-registry")["Items"]
    assert {r["cluster"]["S"] for r in rows} == {"sophia", "polaris"}
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    assert outputs["BaseUrl"] in result.stdout


def _registry(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    assert "polaris: maintenance on" in result.stdout
    assert "polaris: maintenance off" in result.stdout
    assert "acting on AWS stage dev (us-east-1)" in result.stderr
    shown = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert set(shown["clusters"]) == {"sophia", "polaris"}
    row = client("dynamodb", walk.aws).get_item(
        TableName="first-dev-registry", Key={"cluster": {"S": "polaris"}, "key": {"S": "#cluster"}}
    )["Item"]
    assert row["status"]["S"] == "online"


def _smoke(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    assert "Logged in as alice" in result.stderr
    assert result.stdout.splitlines()[-1] == "smoke test passed"
    tokens = json.loads((walk.home / ".config" / "first" / "tokens.json").read_text())
    assert any(DEV_NATIVE_CLIENT_ID in namespace for namespace in tokens["data"])


def _globus_rotated(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    secrets = client("secretsmanager", walk.aws)
    value = secrets.get_secret_value(SecretId="first/dev/globus-client-secret")
    assert value["SecretString"] == walk.env["NEW_GLOBUS_CLIENT_SECRET"]
    assert walk.parameters()["GlobusClientSecretVersionId"] == value["VersionId"]
    assert walk.stack()["StackStatus"] == "UPDATE_COMPLETE"


def _callback_rotated(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    value = client("secretsmanager", walk.aws).get_secret_value(
        SecretId="first/dev/callback-secret"
    )
    assert walk.parameters()["CallbackSecretVersionId"] == value["VersionId"]


def _alarms(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    topic = re.search(r"AlarmTopicArn=(\S+)", result.stdout)
    assert topic and topic.group(1).endswith(":first-dev-alarms")
    subscriptions = client("sns", walk.aws).list_subscriptions_by_topic(TopicArn=topic.group(1))
    assert [s["Endpoint"] for s in subscriptions["Subscriptions"]] == ["ops@example.org"]
    assert json.loads(result.stdout.splitlines()[-1]) == []  # nothing firing
    parameter = load_template()["Parameters"]["AlarmTopicArn"]
    assert re.fullmatch(parameter["AllowedPattern"], topic.group(1))


def _direct_key(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    value = client("secretsmanager", walk.aws).get_secret_value(SecretId="first/dev/direct/cloud")
    assert value["SecretString"] == "sk-your-providers-key"
    # The deployed proxy may read exactly the stage's direct keys, this one among them.
    policies = json.dumps(load_template()["Resources"]["ProxyFunction"]["Properties"]["Policies"])
    assert "first/${Stage}/direct/*" in policies


def _certificate(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    arn = result.stdout.strip()
    certificate = client("acm", walk.aws).describe_certificate(CertificateArn=arn)["Certificate"]
    assert certificate["DomainName"] == "first.example.org"


def _web_acls(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    assert result.stdout.strip() == ""  # none yet in this account


def _upgraded(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    assert "walk: stand-in for git pull --ff-only" in result.stdout
    assert walk.stack()["StackStatus"] == "UPDATE_COMPLETE"
    assert "==> registry" in result.stdout


def _torn_down(walk: Walk, result: subprocess.CompletedProcess[str]) -> None:
    stacks = walk.cfn().list_stacks()["StackSummaries"]
    assert all(s["StackStatus"] == "DELETE_COMPLETE" for s in stacks if s["StackName"] == STACK)
    tables = client("dynamodb", walk.aws).list_tables()["TableNames"]
    assert not [t for t in tables if t.startswith("first-dev-")]
    buckets = client("s3", walk.aws).list_buckets()["Buckets"]
    assert not [b for b in buckets if b["Name"].startswith("first-dev-results-")]
    secrets = client("secretsmanager", walk.aws).list_secrets()["SecretList"]
    assert all(s.get("DeletedDate") for s in secrets if s["Name"].startswith("first/dev/"))


Check = Callable[[Walk, subprocess.CompletedProcess[str]], None]
# Each block of the guide, by its first command: what must be true after it (and what the
# operator does by hand before it, if anything).
CHECKS: dict[str, tuple[Callable[[Walk], None] | None, Check]] = {
    "aws secretsmanager create-secret": (None, _secrets),
    "pip install globus-compute-endpoint": (None, _endpoint),
    "python -m compute_funcs.register": (None, _register),
    "infra/deploy dev": (_edit_samconfig, _deployed),
    "python infra/deploy_tool.py load-registry dev": (None, _registry),
    "export FIRST_AUTH_CLIENT_ID": (None, _smoke),
    "aws secretsmanager put-secret-value --secret-id first/dev/globus-client-secret": (
        None,
        _globus_rotated,
    ),
    "aws secretsmanager put-secret-value --secret-id first/dev/callback-secret": (
        None,
        _callback_rotated,
    ),
    "TOPIC_ARN=$(aws sns create-topic": (None, _alarms),
    "aws acm request-certificate": (None, _certificate),
    "export PROVIDER_KEY": (None, _direct_key),
    "aws wafv2 list-web-acls": (None, _web_acls),
    "git pull": (None, _upgraded),
    "BUCKET=$(aws cloudformation describe-stacks": (None, _torn_down),
}


def _check_for(block: list[str]) -> str:
    keys = [k for k in CHECKS if block[0].startswith(k)]
    key = max(keys, key=len) if keys else None
    assert key is not None, f"no check in CHECKS for the guide's block starting {block[0]!r}"
    return key


def test_every_block_of_the_guide_is_checked() -> None:
    blocks = guide_blocks()
    keys = [_check_for(block) for block in blocks]
    assert sorted(keys) == sorted(CHECKS), "a check for a block the guide no longer has"
    # No placeholder a shell cannot run (<...>, [optional] parts): commands are run verbatim.
    for block in blocks:
        for command in block:
            assert not re.search(r"<[A-Za-z ]+>|\[--|\bSTAGE\b", command), command


def test_guide_blocks_parse_continuations_and_comments() -> None:
    text = "x\n```sh\na --b \\\n  c   # why\n# only a comment\n\nd\n```\n```python\nno\n```\n"
    assert guide_blocks(text) == [["a --b    c", "d"]]


def test_the_operator_guide_walked_end_to_end(walk: Walk) -> None:
    for block in guide_blocks():
        before, check = CHECKS[_check_for(block)]
        if before is not None:
            before(walk)
        result = walk.run(block)
        check(walk, result)
