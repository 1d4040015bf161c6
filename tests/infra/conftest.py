"""Fixtures for the deploy tests: the template as data, SAM's translation, a moto server.

The moto server is the local stack's own (`first_local.moto_server`) in a child process, so that
operator commands run as separate processes (infra/deploy_tool.py) see the stack a test deployed,
exactly as they would see a real account.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from first_local.provision import TEMPLATE, load_template
from first_local.stack import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


@pytest.fixture(scope="session")
def template() -> dict[str, Any]:
    """template.yaml as data (`!Ref X` is `{"Ref": "X"}`); tests must not change it."""
    return load_template(TEMPLATE)


class _NoManagedPolicies:
    """SAM looks up AWS managed policies only for policies named bare; offline there are none."""

    def load(self) -> dict[str, str]:
        return {}


def translate(template: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """The Serverless transform, as CloudFormation would apply it (moto does not)."""
    from samtranslator.translator.transform import transform

    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
    return dict(transform(copy.deepcopy(template), dict(parameters), _NoManagedPolicies()))


@pytest.fixture(scope="session")
def translated(template: dict[str, Any]) -> dict[str, Any]:
    """The translated template for stage `dev`, code at placeholder S3 keys."""
    sam = copy.deepcopy(template)
    for name, resource in sam["Resources"].items():
        if resource["Type"] == "AWS::Serverless::Function":
            resource["Properties"]["CodeUri"] = f"s3://first-code/{name}.zip"
        if resource["Type"] == "AWS::Serverless::LayerVersion":
            resource["Properties"]["ContentUri"] = f"s3://first-code/{name}.zip"
    return translate(sam, {"Stage": "dev"})


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto server (DynamoDB, S3, Lambda, IAM, CloudFormation, ...) in a child process."""
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "first_local.moto_server", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **FAKE_AWS},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline or child.poll() is not None:
                child.kill()
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.1)
    try:
        yield url
    finally:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()


def client(service: str, endpoint: str) -> Any:
    import boto3

    return boto3.client(
        service,
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def operator_env(endpoint: str) -> dict[str, str]:
    """The environment of an operator command pointed at the moto server (every AWS SDK call)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRST_")}
    return {**env, **FAKE_AWS, "AWS_ENDPOINT_URL": endpoint}


# Resources of the translated template that moto cannot create: API Gateway deployments fail on
# a RestApi defined by an OpenAPI body (moto ignores the body, so the API has no methods) and
# AWS::ApiGateway::Stage has no moto support. They are checked statically instead.
MOTO_CANNOT = {"AWS::ApiGateway::Deployment", "AWS::ApiGateway::Stage"}


def _zip(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                info = zipfile.ZipInfo(str(path.relative_to(directory)))
                info.external_attr = (path.stat().st_mode & 0o777) << 16
                archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


STACK_PARAMETERS = {
    "Stage": "dev",
    "GlobusClientId": "0e1c2a5b-8a3d-4c51-9b6e-2f7d4c3b1a00",
    "GatewayScope": "https://auth.globus.org/scopes/0e1c2a5b-8a3d-4c51-9b6e-2f7d4c3b1a00/action_all",
    "AllowedDomains": "anl.gov,uchicago.edu",
    "AllowedGroups": "5b0f3a1c-2d4e-4f60-8a7b-9c0d1e2f3a4b",
    "AdminGroups": "a3c1f0e2-6b7d-4e8f-9a0b-1c2d3e4f5a6b",
    "CallbackSecretVersionId": "v-callback-2",
}


@pytest.fixture(scope="session")
def deployed(
    template: dict[str, Any], moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The translated template, with the real staged code, created as stack first-dev in moto."""
    from infra.deploy_tool import stage

    staged = stage(tmp_path_factory.mktemp("build"))
    s3 = client("s3", moto_endpoint)
    s3.create_bucket(Bucket="first-code")
    sam = json.loads(json.dumps(template))
    zips = {}
    for name, directory in staged.items():
        zips[name] = _zip(directory)
        s3.put_object(Bucket="first-code", Key=f"{name}.zip", Body=zips[name])
        uri_field = "ContentUri" if name == "CoreLayer" else "CodeUri"
        sam["Resources"][name]["Properties"][uri_field] = f"s3://first-code/{name}.zip"
    # Functions that share a staged directory (the Chalice app's scheduled functions run the
    # control plane's code) use the same archive.
    for resource in sam["Resources"].values():
        properties = resource.get("Properties", {})
        if resource["Type"] == "AWS::Serverless::Function" and not str(
            properties.get("CodeUri", "")
        ).startswith("s3://"):
            owner = {
                "build/control-plane/": "ControlPlaneFunction",
                "build/proxy/": "ProxyFunction",
            }
            properties["CodeUri"] = f"s3://first-code/{owner[properties['CodeUri']]}.zip"
    cloudformation = translate(sam, STACK_PARAMETERS)
    stripped = {k for k, r in cloudformation["Resources"].items() if r["Type"] in MOTO_CANNOT}
    assert {cloudformation["Resources"][k]["Type"] for k in stripped} == MOTO_CANNOT
    for logical_id in stripped:
        del cloudformation["Resources"][logical_id]
    cfn = client("cloudformation", moto_endpoint)
    cfn.create_stack(
        StackName="first-dev",
        TemplateBody=json.dumps(cloudformation),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in STACK_PARAMETERS.items()],
        Capabilities=["CAPABILITY_IAM"],
    )
    stack = cfn.describe_stacks(StackName="first-dev")["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    resources = cfn.list_stack_resources(StackName="first-dev")["StackResourceSummaries"]
    return {
        "endpoint": moto_endpoint,
        "outputs": {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]},
        "resources": {r["LogicalResourceId"]: r for r in resources},
        "template": cloudformation,
        "zips": zips,
    }
