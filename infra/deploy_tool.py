"""What `infra/deploy` needs besides the SAM CLI: staged code, parameter overrides, the registry.

  python infra/deploy_tool.py stage [--out build]        stage the code template.yaml points at
  python infra/deploy_tool.py overrides STAGE            parameter overrides, one a line
  python infra/deploy_tool.py load-registry STAGE [FILE] load the registry into the deployed table

`stage` writes four directories (template.yaml's CodeUri/ContentUri):
  build/core-layer/     first_core and requirements.txt (the runtime pins of requirements.txt but
                        chalice); `sam build` installs them into the layer's python/ directory.
  build/proxy/          run.sh at the root (the handler) and functions/proxy/, so that
                        `python -m uvicorn functions.proxy.app:app` finds the app.
  build/control-plane/  app.py (+ chalicelib/), and chalice/__init__.py + chalice/app.py, the
                        Chalice runtime: exactly the files `chalice package` puts in its zip.
  build/scheduled/      functions/scheduled.py and functions/submitter.py: the scheduled and
                        queue-fed functions, plain handlers (first_core comes from the layer).

`overrides` reads the stage's parameter_overrides from infra/samconfig.toml and adds the
AWSCURRENT version ids of the two Secrets Manager secrets, so that a rotated secret reaches the
functions on the next deploy (CloudFormation re-reads a dynamic reference only when it changes).
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import stat
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMCONFIG = ROOT / "infra" / "samconfig.toml"
# Shipped with the control plane's own code (as `chalice package` does), not in the layer.
NOT_IN_LAYER = {"chalice"}
SECRET_PARAMETERS = {
    "GlobusClientSecretName": "GlobusClientSecretVersionId",
    "CallbackSecretName": "CallbackSecretVersionId",
}


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(
        source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    )


def _requirement_name(line: str) -> str:
    name = line.split(";")[0]
    for separator in ("[", "=", "<", ">", "!", "~", " "):
        name = name.split(separator)[0]
    return name.strip().lower().replace("_", "-")


def layer_requirements(root: Path = ROOT) -> list[str]:
    lines = []
    for raw in (root / "requirements.txt").read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line and _requirement_name(line) not in NOT_IN_LAYER:
            lines.append(line)
    return lines


def stage_layer(out: Path, root: Path = ROOT) -> Path:
    target = out / "core-layer"
    _copy_tree(root / "layers" / "core" / "first_core", target / "first_core")
    (target / "requirements.txt").write_text("\n".join(layer_requirements(root)) + "\n")
    return target


def stage_proxy(out: Path, root: Path = ROOT) -> Path:
    target = out / "proxy"
    (target / "functions" / "proxy").mkdir(parents=True)
    shutil.copy2(root / "functions" / "__init__.py", target / "functions" / "__init__.py")
    for source in (root / "functions" / "proxy").glob("*.py"):
        shutil.copy2(source, target / "functions" / "proxy" / source.name)
    run = target / "run.sh"
    shutil.copy2(root / "functions" / "proxy" / "run.sh", run)
    run.chmod(run.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return target


def stage_control_plane(out: Path, root: Path = ROOT) -> Path:
    import chalice
    import chalice.app

    target = out / "control-plane"
    (target / "chalice").mkdir(parents=True)
    shutil.copy2(root / "app.py", target / "app.py")
    if (root / "chalicelib").is_dir():
        _copy_tree(root / "chalicelib", target / "chalicelib")
    shutil.copy2(inspect.getfile(chalice.app), target / "chalice" / "app.py")
    shutil.copy2(inspect.getfile(chalice), target / "chalice" / "__init__.py")
    return target


def stage_scheduled(out: Path, root: Path = ROOT) -> Path:
    target = out / "scheduled"
    (target / "functions").mkdir(parents=True)
    for name in ("__init__.py", "scheduled.py", "submitter.py"):
        shutil.copy2(root / "functions" / name, target / "functions" / name)
    return target


def stage(out: Path, root: Path = ROOT) -> dict[str, Path]:
    """Stage every code directory under `out`, replacing what an earlier run left there."""
    for name in ("core-layer", "proxy", "control-plane", "scheduled"):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    scheduled = stage_scheduled(out, root)
    return {
        "CoreLayer": stage_layer(out, root),
        "ProxyFunction": stage_proxy(out, root),
        "ControlPlaneFunction": stage_control_plane(out, root),
        "ReconcilerFunction": scheduled,
        "HealthPollerFunction": scheduled,
        "BatchDriverFunction": scheduled,
        "SubmitterFunction": scheduled,
    }


def samconfig_stage(stage_name: str, path: Path = SAMCONFIG) -> dict[str, Any]:
    config = tomllib.loads(path.read_text())
    if stage_name not in config or "deploy" not in config[stage_name]:
        known = sorted(k for k, v in config.items() if isinstance(v, dict) and "deploy" in v)
        raise SystemExit(f"no [{stage_name}.deploy.parameters] in {path}; stages: {known}")
    return dict(config[stage_name]["deploy"]["parameters"])


def parameter_overrides(stage_name: str, path: Path = SAMCONFIG) -> list[str]:
    """The `Key=Value` items of the stage's parameter_overrides (a TOML list or one string)."""
    value = samconfig_stage(stage_name, path).get("parameter_overrides", [])
    return list(value) if isinstance(value, list) else value.split()


def _template_default(parameter: str) -> str:
    from first_local.provision import TEMPLATE, load_template

    return str(load_template(TEMPLATE)["Parameters"][parameter].get("Default", ""))


def current_secret_versions(items: list[str], region: str | None) -> list[str]:
    import boto3

    given = dict(item.split("=", 1) for item in items)
    secrets = boto3.client("secretsmanager", region_name=region)
    pinned = []
    for name_parameter, version_parameter in SECRET_PARAMETERS.items():
        if version_parameter in given:
            continue  # pinned by hand in samconfig
        secret = given.get(name_parameter) or _template_default(name_parameter)
        try:
            versions = secrets.describe_secret(SecretId=secret)["VersionIdsToStages"]
        except secrets.exceptions.ResourceNotFoundException:
            raise SystemExit(
                f"Secrets Manager secret {secret!r} ({name_parameter}) does not exist in "
                f"{region or 'the default region'}; create it first (infra/OPERATOR.md)."
            ) from None
        current = [v for v, stages in versions.items() if "AWSCURRENT" in stages]
        pinned.append(f"{version_parameter}={current[0]}")
    return pinned


def _overrides(args: argparse.Namespace) -> int:
    items = parameter_overrides(args.stage)
    region = samconfig_stage(args.stage).get("region")
    for item in items + current_secret_versions(items, region):
        print(item)
    return 0


def _load_registry(args: argparse.Namespace) -> int:
    import boto3

    parameters = samconfig_stage(args.stage)
    region = parameters.get("region") or boto3.session.Session().region_name
    stack = boto3.client("cloudformation", region_name=region).describe_stacks(
        StackName=parameters["stack_name"]
    )["Stacks"][0]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    print(f"{parameters['stack_name']}: base URL {outputs['BaseUrl']}")
    registry = Path(args.file or outputs["RegistryFile"])
    if not registry.is_absolute():
        registry = ROOT / registry
    if not registry.exists():
        # A first deploy comes before the functions are registered: nothing to load yet.
        print(
            f"registry not loaded: {registry} does not exist. Write it (format: "
            "infra/registry/aws-example.yaml), then run: "
            f"python infra/deploy_tool.py load-registry {args.stage}"
        )
        return 0
    # The settings are read once, at import: point them at the deployed tables first.
    os.environ.update(
        {
            "FIRST_STAGE": args.stage,
            "FIRST_AWS_REGION": region,
            "FIRST_TABLE_PREFIX": outputs["TablePrefix"],
            "FIRST_RESULTS_BUCKET": outputs["ResultsBucketName"],
        }
    )
    os.environ.pop("FIRST_AWS_ENDPOINT_URL", None)
    from first_local.cli import main

    on_aws = ["--aws", "--stage", args.stage, "--region", region]
    return main(["registry", "load", *on_aws, str(registry)])


def _stage(args: argparse.Namespace) -> int:
    for name, path in stage(Path(args.out).resolve()).items():
        print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deploy_tool.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    staging = commands.add_parser("stage", help="stage the code directories for sam build")
    staging.add_argument("--out", default=str(ROOT / "build"))
    staging.set_defaults(run=_stage)
    overrides = commands.add_parser("overrides", help="parameter overrides for sam deploy")
    overrides.add_argument("stage")
    overrides.set_defaults(run=_overrides)
    registry = commands.add_parser("load-registry", help="load the registry into a deployment")
    registry.add_argument("stage")
    registry.add_argument("file", nargs="?")
    registry.set_defaults(run=_load_registry)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
