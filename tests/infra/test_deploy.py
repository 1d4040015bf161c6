"""The operator's side: scripts, samconfig, Chalice config, staged code, smoke test, examples.

Operator commands run as child processes, pointed at the moto server (AWS_ENDPOINT_URL) where
tests/infra/test_template.py deployed stack first-dev, as they would run against an account.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from first_local.stack import free_port
from infra.deploy_tool import layer_requirements, parameter_overrides, stage
from tests.infra.conftest import PROJECT_ROOT, client, operator_env

INFRA = PROJECT_ROOT / "infra"
SCRIPTS = [INFRA / "deploy", INFRA / "smoke", PROJECT_ROOT / "functions" / "proxy" / "run.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_scripts_are_executable_and_parse(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert script.read_text().startswith("#!"), script
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_deploy_refuses_to_run_without_a_stage() -> None:
    result = subprocess.run([str(INFRA / "deploy")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: infra/deploy STAGE" in result.stderr


# ------------------------------------------------------------------ samconfig and chalice


def test_samconfig_has_a_complete_config_per_stage(template: dict[str, Any]) -> None:
    config = tomllib.loads((INFRA / "samconfig.toml").read_text())
    required = {name for name, p in template["Parameters"].items() if "Default" not in p}
    for stage_name in ("dev", "prod"):
        deploy = config[stage_name]["deploy"]["parameters"]
        assert deploy["stack_name"] == f"first-{stage_name}"
        assert deploy["capabilities"] == "CAPABILITY_IAM"
        # sam build reads the source template; sam deploy must read the built one.
        assert config[stage_name]["build"]["parameters"]["template_file"] == "template.yaml"
        assert "template_file" not in deploy
        assert "global" not in config[stage_name]
        items = dict(i.split("=", 1) for i in parameter_overrides(stage_name))
        assert items["Stage"] == stage_name
        assert set(items) <= set(template["Parameters"]), set(items) - set(template["Parameters"])
        assert required <= set(items), f"{stage_name} lacks {required - set(items)}"
        # Secrets are named, never given.
        assert not {k for k in items if "Secret" in k and not k.endswith("SecretName")}
        assert items["RegistryFile"] == f"infra/registry/{stage_name}.yaml"


def test_chalice_config_is_valid_and_agrees_with_the_template(template: dict[str, Any]) -> None:
    from chalice.cli.factory import CLIFactory
    from chalice.deploy.validate import validate_configuration

    import app

    control = template["Resources"]["ControlPlaneFunction"]["Properties"]
    for stage_name in ("dev", "prod"):
        config = CLIFactory(str(PROJECT_ROOT)).create_config_obj(chalice_stage_name=stage_name)
        validate_configuration(config)
        assert config.app_name == app.app.app_name
        assert config.api_gateway_stage == stage_name
        assert config.api_gateway_endpoint_type == "REGIONAL"
        assert config.lambda_memory_size == control["MemorySize"]
        assert config.lambda_timeout == control["Timeout"]


# ------------------------------------------------------------------ staged code


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return stage(tmp_path_factory.mktemp("build"))


def test_the_layer_holds_the_core_and_the_runtime_pins_but_chalice(
    staged: dict[str, Path],
) -> None:
    layer = staged["CoreLayer"]
    assert (layer / "first_core" / "tables.py").is_file()
    assert not list(layer.rglob("__pycache__"))
    pins = (layer / "requirements.txt").read_text().split()
    assert pins == layer_requirements()
    assert "pynamodb==6.1.0" in pins
    assert not [p for p in pins if p.startswith("chalice")]


def test_the_staged_control_plane_runs_on_the_chalice_runtime_it_ships(
    staged: dict[str, Path],
) -> None:
    code = staged["ControlPlaneFunction"]
    probe = (
        "import chalice, app; "
        f"assert chalice.__file__.startswith({str(code)!r}), chalice.__file__; "
        "print(sorted(app.app.routes))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=code, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "/callbacks/{request_id}" in result.stdout


def test_the_scheduled_functions_ship_without_chalice_or_the_routes(
    staged: dict[str, Path],
) -> None:
    code = staged["ReconcilerFunction"]
    others = ("HealthPollerFunction", "BatchDriverFunction", "SubmitterFunction")
    assert {staged[name] for name in others} == {code}
    assert sorted(p.name for p in (code / "functions").iterdir()) == [
        "__init__.py",
        "scheduled.py",
        "submitter.py",
    ]
    probe = textwrap.dedent(
        """
        import importlib.abc, sys

        class NotShipped(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"chalice", "chalicelib", "app"}:
                    raise ImportError(name)
                return None

        sys.meta_path.insert(0, NotShipped())
        import functions.scheduled, functions.submitter
        assert functions.scheduled.__file__.startswith(sys.argv[1]), functions.scheduled.__file__
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(code)],
        cwd=code,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _wait_port(port: int, child: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if child.poll() is not None or time.monotonic() > deadline:
            output = child.stdout.read() if child.stdout else b""
            raise AssertionError(f"run.sh did not listen on {port}: {output!r}")
        time.sleep(0.1)


def test_run_sh_serves_the_proxy_from_the_staged_layout(staged: dict[str, Path]) -> None:
    """What Lambda Web Adapter starts: uvicorn on $PORT, the proxy answering in OpenAI's shape."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRST_")}
    env.update(
        PORT=str(port),
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        FIRST_CALLBACK_SECRET="x" * 32,
        FIRST_TABLE_PREFIX="first-dev-",
    )
    child = subprocess.Popen(
        [str(staged["ProxyFunction"] / "run.sh")],
        cwd="/",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_port(port, child)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}", method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        error = json.loads(refused.value.read())["error"]
        assert set(error) == {"message", "type", "param", "code"}
    finally:
        child.terminate()
        child.wait(timeout=10)


# ------------------------------------------------------------------ smoke


@pytest.fixture(scope="module")
def mock_openai() -> Iterator[str]:
    """The local stack's mock vLLM: an OpenAI-compatible server, enough for the smoke script."""
    import uvicorn

    from first_local.mock_vllm import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "mock server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def test_smoke_passes_against_an_openai_compatible_server(mock_openai: str) -> None:
    result = subprocess.run(
        [str(INFRA / "smoke"), mock_openai, "any-token"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["models", "chat", "stream"]
    assert "finish_reason=" in lines[2]
    assert lines[-1] == "smoke test passed"


def test_smoke_fails_loudly(mock_openai: str, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke", INFRA / "smoke.py")
    assert spec and spec.loader
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    closed = f"http://127.0.0.1:{free_port()}/v1"
    assert smoke.main([closed, "token", "--timeout", "5"]) == 1
    assert "FAIL models: APIConnectionError" in capsys.readouterr().err
    assert smoke.main([mock_openai.removesuffix("/v1"), "token"]) == 1
    assert "must end in /v1" in capsys.readouterr().err
    assert smoke.main([mock_openai, "token", "--model", "no-such-model"]) == 1
    assert "is not served" in capsys.readouterr().err


# ------------------------------------------------------------------ operator commands vs moto


def _deploy_tool(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(INFRA / "deploy_tool.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=operator_env(endpoint),
        cwd=PROJECT_ROOT,
    )


def test_overrides_carry_the_current_secret_versions_so_rotation_lands(
    moto_endpoint: str,
) -> None:
    secrets = client("secretsmanager", moto_endpoint)
    missing = _deploy_tool(moto_endpoint, "overrides", "dev")
    assert missing.returncode != 0
    assert "first/dev/globus-client-secret" in missing.stderr
    globus = secrets.create_secret(Name="first/dev/globus-client-secret", SecretString="s1")
    callback = secrets.create_secret(Name="first/dev/callback-secret", SecretString="c1")
    first = _deploy_tool(moto_endpoint, "overrides", "dev")
    assert first.returncode == 0, first.stderr
    items = first.stdout.splitlines()
    assert items[: len(parameter_overrides("dev"))] == parameter_overrides("dev")
    assert f"GlobusClientSecretVersionId={globus['VersionId']}" in items
    assert f"CallbackSecretVersionId={callback['VersionId']}" in items
    rotated = secrets.put_secret_value(SecretId="first/dev/callback-secret", SecretString="c2")
    second = _deploy_tool(moto_endpoint, "overrides", "dev").stdout.splitlines()
    assert f"CallbackSecretVersionId={rotated['VersionId']}" in second
    assert f"GlobusClientSecretVersionId={globus['VersionId']}" in second


def test_the_registry_loads_into_the_deployed_table(deployed: dict[str, Any]) -> None:
    endpoint = deployed["endpoint"]
    # The example for AWS: the local registry names no functions (the local stack registers
    # them at each start).
    result = _deploy_tool(endpoint, "load-registry", "dev", "infra/registry/aws-example.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert deployed["outputs"]["BaseUrl"] in result.stdout
    rows = client("dynamodb", endpoint).scan(TableName="first-dev-registry")["Items"]
    assert {(r["cluster"]["S"], r["key"]["S"]) for r in rows} >= {
        ("sophia", "#cluster"),
        ("polaris", "vllm#meta-llama/Meta-Llama-3-8B-Instruct"),
    }
    # The stage's own file does not exist yet: reported, not an error (first deploy).
    first_deploy = _deploy_tool(endpoint, "load-registry", "dev")
    assert first_deploy.returncode == 0
    assert "registry not loaded" in first_deploy.stdout


# ------------------------------------------------------------------ docs and examples


def test_the_operator_guide_lists_every_setting() -> None:
    from first_core.settings import Settings

    guide = (INFRA / "OPERATOR.md").read_text()
    missing = [f"FIRST_{name.upper()}" for name in Settings.model_fields]
    missing = [variable for variable in missing if f"`{variable}`" not in guide]
    assert not missing, f"infra/OPERATOR.md, section Settings, lacks {missing}"


def test_the_aws_registry_example_is_a_valid_registry() -> None:
    from first_core.registry import load_file

    registry = load_file(INFRA / "registry" / "aws-example.yaml")
    assert set(registry.clusters) == {"sophia", "polaris"}


def test_the_pbs_endpoint_example_is_a_globus_compute_engine_on_pbs() -> None:
    config = yaml.safe_load(
        (INFRA.parent / "compute_funcs" / "pbs-endpoint-example.yaml").read_text()
    )
    engine = config["engine"]
    assert engine["type"] == "GlobusComputeEngine"
    provider = engine["provider"]
    assert provider["type"] == "PBSProProvider"
    assert "conda activate" in provider["worker_init"]
    assert "vllm serve" in provider["worker_init"]
    assert "VLLM_BASE_URL" in provider["worker_init"]  # what compute_funcs read
