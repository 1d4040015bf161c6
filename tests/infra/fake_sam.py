"""A stand-in for the AWS SAM CLI (`sam build`, `sam deploy`) for the walk of infra/OPERATOR.md.

The real SAM CLI is installed on its own (pipx) and needs PyPI for `sam build`; moto cannot serve
the change sets `sam deploy` makes for a SAM template. This does what they do, offline, with the
same inputs infra/deploy gives them:

  sam build --config-file F --config-env E     checks the template and the staged code directories
  sam deploy --config-file F --config-env E --parameter-overrides K=V ...
      uploads each code directory as a zip, applies the Serverless transform (aws-sam-translator,
      as CloudFormation would), and creates or updates the samconfig's stack in moto
      (AWS_ENDPOINT_URL): what moto cannot create (API Gateway deployment and stage) is left out,
      as in tests/infra/conftest.py.

It is run as `python tests/infra/fake_sam.py ...` from a `sam` script on the walk's PATH.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from first_local.provision import load_template  # noqa: E402
from tests.infra.conftest import MOTO_CANNOT, _zip, client, translate  # noqa: E402

CODE_BUCKET = "aws-sam-cli-managed-default-samclisourcebucket"


def _code_resources(template: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Logical id -> (the property naming its code, the directory) for functions and layers."""
    found = {}
    for logical_id, resource in template["Resources"].items():
        if resource["Type"] == "AWS::Serverless::Function":
            found[logical_id] = ("CodeUri", str(resource["Properties"]["CodeUri"]))
        elif resource["Type"] == "AWS::Serverless::LayerVersion":
            found[logical_id] = ("ContentUri", str(resource["Properties"]["ContentUri"]))
    return found


def build(config: dict[str, Any]) -> int:
    template_file = Path(config["build"]["parameters"]["template_file"])
    template = load_template(template_file)
    missing = [d for _, d in _code_resources(template).values() if not Path(d).is_dir()]
    if missing:
        print(f"Build Failed: no code directory {missing}", file=sys.stderr)
        return 1
    print(f"Build Succeeded ({template_file}, {len(_code_resources(template))} artifacts)")
    return 0


def deploy(config: dict[str, Any], overrides: list[str]) -> int:
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    settings = config["deploy"]["parameters"]
    stack_name = settings["stack_name"]
    template = load_template(Path(config["build"]["parameters"]["template_file"]))
    s3 = client("s3", endpoint)
    s3.create_bucket(Bucket=CODE_BUCKET)
    prefix = settings.get("s3_prefix", stack_name)
    for logical_id, (field, directory) in _code_resources(template).items():
        archive = _zip(Path(directory))
        key = f"{prefix}/{hashlib.md5(archive).hexdigest()}"  # content-addressed, as sam names them
        s3.put_object(Bucket=CODE_BUCKET, Key=key, Body=archive)
        template["Resources"][logical_id]["Properties"][field] = f"s3://{CODE_BUCKET}/{key}"
    parameters = dict(item.split("=", 1) for item in overrides)
    unknown = set(parameters) - set(template["Parameters"])
    if unknown:
        print(f"Error: unknown parameters {sorted(unknown)}", file=sys.stderr)
        return 1
    cloudformation = translate(template, parameters)
    for logical_id in [
        k for k, r in cloudformation["Resources"].items() if r["Type"] in MOTO_CANNOT
    ]:
        del cloudformation["Resources"][logical_id]
    cfn = client("cloudformation", endpoint)
    arguments = {
        "StackName": stack_name,
        "TemplateBody": json.dumps(cloudformation),
        "Parameters": [{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        "Capabilities": [settings["capabilities"]],
        "Tags": [
            {"Key": k, "Value": v}
            for k, v in (item.split("=", 1) for item in settings.get("tags", "").split())
        ],
    }
    existing = [
        s
        for s in cfn.list_stacks()["StackSummaries"]
        if s["StackName"] == stack_name and s["StackStatus"] != "DELETE_COMPLETE"
    ]
    if existing:
        cfn.update_stack(**arguments)
    else:
        cfn.create_stack(**arguments)
    stack = cfn.describe_stacks(StackName=stack_name)["Stacks"][0]
    status = stack["StackStatus"]
    print(f"{stack_name}: {status}")
    for output in stack.get("Outputs", []):
        print(f"  {output['OutputKey']}: {output['OutputValue']}")
    return 0 if status in ("CREATE_COMPLETE", "UPDATE_COMPLETE") else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sam (stand-in)")
    parser.add_argument("command", choices=["build", "deploy"])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--config-env", required=True)
    parser.add_argument("--parameter-overrides", nargs="*", default=[])
    args = parser.parse_args(argv)
    config = tomllib.loads(Path(args.config_file).read_text())[args.config_env]
    if args.command == "build":
        return build(config)
    return deploy(config, args.parameter_overrides)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
