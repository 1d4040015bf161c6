"""`first-gateway`: run the local stack, mint dev tokens, manage the registry.

first-gateway dev [--port 8000] [--backend-url URL]   the whole stack, in the foreground
first-gateway dev --port 8001 --join STATE_FILE       a second gateway process on that stack
first-gateway token --user alice [--expired]          a dev access token for a dev identity
first-gateway token --service-account                 the dev pipeline's (a service account)
first-gateway registry load FILE | show               validate and publish / print the registry
first-gateway registry maintenance CLUSTER on|off     an operator's maintenance switch

`registry` acts on the running local stack (the state file `dev` writes by default) with moto's
address and dummy keys, whatever AWS variables are exported; on a deployment only with
`--aws --stage STAGE [--region R]`. It says on stderr which one it acts on. A mistake (no running
stack, an unknown cluster, an unreadable state file) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

EXAMPLE = """\
FIRST gateway is up at {base}/v1  (FIRST routes: {base}/resource_server/v1/{{cluster}}/vllm/v1)
clusters: sophia, polaris  |  backend: {backend}

alice's access token (valid 48 h; others: first-gateway token --user bob|carol|dave):
{token}

    from openai import OpenAI
    client = OpenAI(base_url="{base}/v1", api_key="<the token above>")
    reply = client.chat.completions.create(model="meta-llama/Meta-Llama-3-8B-Instruct",
        messages=[{{"role": "user", "content": "Hello"}}])
    print(reply.choices[0].message.content)

Operator commands find this stack with nothing exported (its state: {state}):
    first-gateway registry maintenance polaris on        first-auth login

Batches: client.files.create(file=open("in.jsonl", "rb"), purpose="batch") then
client.batches.create(...); FIRST batches read and write paths on the clusters' file system,
each user under their own directory (relative paths start there), alice's:
{cluster_fs}/alice@anl.gov
"""


def _dev(args: argparse.Namespace) -> int:
    from first_local.globus_standin import mint_token
    from first_local.stack import LocalStack, StackOptions

    options = StackOptions(
        host=args.host,
        port=args.port,
        backend_url=args.backend_url,
        backend_api_key=args.backend_api_key,
        registry=Path(args.registry),
        workers=args.workers,
        mock_delay=args.mock_delay,
        mock_token_rate=args.mock_token_rate,
        backend_errors=args.backend_errors,
        backend_hang=args.backend_hang,
        result_wait_seconds=args.result_wait,
        reconcile_every=args.reconcile_every,
        reconcile_grace=args.reconcile_grace,
        drop_callbacks=args.drop_callbacks,
        duplicate_callbacks=args.duplicate_callbacks,
        delay_callbacks=args.delay_callbacks,
        fail_compute=args.fail_compute,
        kill_workers=args.kill_workers,
        kill_submitter=args.kill_submitter,
        throttle_writes=args.throttle_writes,
        compute_api_limit=args.compute_api_limit,
        endpoint_start_delay=args.endpoint_start_delay,
        state_file=Path(args.state_file) if args.state_file else None,
        join=Path(args.join) if args.join else None,
        health_every=args.health_every,
        stop_endpoints=[e for e in (args.stop_endpoints or "").split(",") if e],
        cluster_fs=Path(args.cluster_fs) if args.cluster_fs else None,
        metrics=args.metrics,
    )

    def ready(stack: LocalStack) -> None:
        print(
            EXAMPLE.format(
                base=stack.base_url,
                backend=args.backend_url or "built-in mock vLLM",
                token=mint_token("alice"),
                cluster_fs=stack.cluster_fs,
                state=", ".join(str(p) for p in stack.state_paths()),
            ),
            flush=True,
        )

    with contextlib.suppress(KeyboardInterrupt):
        LocalStack(options).run(on_ready=ready)
    return 0


def _token(args: argparse.Namespace) -> int:
    from first_local.globus_standin import DEV_IDENTITIES, mint_client_token, mint_token

    if args.service_account:
        print(mint_client_token())
        return 0
    if args.user not in DEV_IDENTITIES:
        print(
            f"unknown dev user {args.user!r}; choose from {', '.join(DEV_IDENTITIES)}",
            file=sys.stderr,
        )
        return 2
    print(mint_token(args.user, expired=args.expired))
    return 0


def _registry(args: argparse.Namespace) -> int:
    """`first-gateway registry ...` on the running local stack, or on AWS with `--aws`."""
    from first_local.target import TargetError, check_aws_credentials, resolve

    try:
        target = resolve(
            aws=args.aws,
            stage=args.stage,
            region=args.region,
            state_file=Path(args.state_file) if args.state_file else None,
        )
        # Before first_core is imported: its settings (tables, endpoint) are read once.
        target.apply()
        if args.aws:
            check_aws_credentials()
    except TargetError as error:
        return _refuse(str(error))
    print(f"acting on {target.description}", file=sys.stderr)
    try:
        return _registry_action(args)
    except Exception as error:  # AWS's own failures are told in one line; bugs re-raised
        failure = _aws_failure(error)
        if failure is None:
            raise
        status, message = failure
        print(f"first-gateway: {message}", file=sys.stderr)
        return status


def _registry_action(args: argparse.Namespace) -> int:
    from first_core.registry import Registry, RegistryFileError, load_file, publish

    if args.action == "load":
        try:
            registry = load_file(args.file)
        except OSError as error:
            return _refuse(f"cannot read {args.file}: {error.strerror or error}")
        except RegistryFileError as error:
            print(error, file=sys.stderr)
            return 2
        print(f"wrote {publish(registry)} registry rows")
        return 0
    if args.action == "maintenance":
        from first_core.registry.health import set_maintenance

        try:
            set_maintenance(args.cluster, args.state == "on")
        except KeyError:
            known = ", ".join(sorted(Registry.current().clusters)) or "none"
            return _refuse(f"no cluster {args.cluster!r} in the registry (clusters: {known})")
        print(f"{args.cluster}: maintenance {args.state}")
        return 0
    snapshot = Registry.current()
    print(
        json.dumps(
            {
                "clusters": {c.name: c.model_dump() for c in snapshot.clusters.values()},
                "endpoints": [e.model_dump() for e in snapshot.endpoints],
            },
            indent=2,
        )
    )
    return 0


def _refuse(message: str) -> int:
    """A user mistake: one line on stderr, exit status 2."""
    print(f"first-gateway: {message}", file=sys.stderr)
    return 2


def _aws_failure(error: Exception) -> tuple[int, str] | None:
    """Exit status and one line for a failure of AWS (or moto) itself: a table that does not
    exist (a stage not deployed there: a mistake, 2), a refusal or no network (1); None for
    anything else, which is a bug and keeps its traceback."""
    from botocore.exceptions import BotoCoreError, ClientError
    from pynamodb.exceptions import PynamoDBException

    from first_core.settings import get_settings

    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        detail = error.response.get("Error", {}).get("Message", "")
    elif isinstance(error, PynamoDBException):
        code, detail = error.cause_response_code or "", error.cause_response_message or ""
        if not code:  # no answer from AWS at all: pynamodb's message names the cause
            detail = (str(error).splitlines() or [type(error).__name__])[0]
    elif isinstance(error, BotoCoreError):
        code, detail = "", (str(error).splitlines() or [type(error).__name__])[0]
    else:
        return None
    settings = get_settings()
    if code == "ResourceNotFoundException":
        return 2, (
            f"no table {settings.table_prefix}registry in {settings.aws_region}: is stage "
            f"{settings.stage} deployed there? (--stage, --region)"
        )
    return 1, f"AWS call failed: {code + ': ' if code else ''}{detail}"


def _api_limit(text: str) -> str:
    from first_local.compute_standin.limits import ApiLimit

    try:
        return str(ApiLimit.parse(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give N/S (calls per seconds) or 0") from None


def main(argv: list[str] | None = None) -> int:
    """`first-gateway`: start the local stack (`dev`), or work on a registry (`registry ...`); the
    exit status says whether it worked."""
    parser = argparse.ArgumentParser(
        prog="first-gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev", help="run the whole local stack in the foreground")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    dev.add_argument("--backend-url", help="an OpenAI-compatible server (…/v1) instead of the mock")
    dev.add_argument("--backend-api-key", help="API key for --backend-url")
    dev.add_argument(
        "--registry", default=str(Path(__file__).resolve().parents[2] / "registry" / "local.yaml")
    )
    dev.add_argument("--workers", type=int, default=4, help="compute workers per endpoint")
    dev.add_argument(
        "--mock-delay", type=float, default=0.0, help="mock vLLM: seconds to first token"
    )
    dev.add_argument(
        "--mock-token-rate", type=float, default=0.0, help="mock vLLM: tokens/s (0 = max)"
    )
    dev.add_argument(
        "--backend-errors", type=float, default=0.0, help="fraction of mock answers that are 500"
    )
    dev.add_argument(
        "--backend-hang", type=float, default=0.0, help="fraction of mock requests that hang"
    )
    dev.add_argument("--result-wait", type=float, default=300.0, help="seconds before a 504")
    dev.add_argument(
        "--reconcile-every", type=float, default=5.0, help="reconciler period in s (0 = off)"
    )
    dev.add_argument(
        "--reconcile-grace",
        type=float,
        default=10.0,
        help="the reconciler looks at open requests older than this (s)",
    )
    faults = dev.add_argument_group("fault injection (first_local.faults; all off by default)")
    faults.add_argument(
        "--drop-callbacks", type=float, default=0.0, help="fraction of callbacks lost"
    )
    faults.add_argument(
        "--duplicate-callbacks", type=float, default=0.0, help="fraction delivered twice"
    )
    faults.add_argument(
        "--delay-callbacks", type=float, default=0.0, help="seconds every callback is held"
    )
    faults.add_argument(
        "--fail-compute",
        type=float,
        default=0.0,
        help="fraction of compute tasks whose function raises on the endpoint",
    )
    faults.add_argument(
        "--kill-workers",
        type=float,
        default=0.0,
        help="fraction of compute tasks whose worker process is killed mid-task",
    )
    faults.add_argument(
        "--kill-submitter",
        type=float,
        default=0.0,
        help="fraction of the submitter's batches that die after sending, before writing "
        "their task ids",
    )
    faults.add_argument(
        "--throttle-writes",
        type=float,
        default=0.0,
        help="fraction of DynamoDB writes answered ProvisionedThroughputExceededException",
    )
    dev.add_argument("--state-file", help="write the stack's addresses here as JSON")
    dev.add_argument(
        "--metrics",
        action="store_true",
        help="print CloudWatch EMF metric lines (Requests, Refused, ...) as Lambda would",
    )
    dev.add_argument(
        "--cluster-fs",
        metavar="DIR",
        help="the clusters' file system for FIRST batches (input paths and outputs under it; "
        "default: a new temporary directory)",
    )
    dev.add_argument(
        "--join",
        metavar="STATE_FILE",
        help="start only another gateway on the running stack whose --state-file this is: "
        "its moto server, Globus stand-ins (Auth, Compute and its endpoints) and backend",
    )
    dev.add_argument(
        "--compute-api-limit",
        metavar="N/S",
        default="20/10",
        type=_api_limit,
        help="Globus Compute's API limit per client identity: N calls per S seconds, 429 "
        "beyond (default 20/10, the service's own; 0: none)",
    )
    dev.add_argument(
        "--endpoint-start-delay",
        metavar="S",
        type=float,
        help="every compute endpoint is online with no workers (its models 'starting') until "
        "S seconds after the gateway first answers /health",
    )
    dev.add_argument(
        "--health-every",
        type=float,
        default=10.0,
        help="seconds between health polls (endpoint status + qstat into the registry; 0: never)",
    )
    dev.add_argument(
        "--stop-endpoints",
        metavar="ID[,ID]",
        help="compute endpoints offline from the start (their tasks wait for them): endpoint "
        "ids, or cluster names for all of a cluster's, e.g. polaris",
    )
    dev.set_defaults(run=_dev)

    token = commands.add_parser("token", help="print a dev access token")
    token.add_argument("--user", default="alice")
    token.add_argument("--expired", action="store_true")
    token.add_argument(
        "--service-account",
        action="store_true",
        help="the dev pipeline's own token (a client identity in FIRST_SERVICE_ACCOUNTS)",
    )
    token.set_defaults(run=_token)

    registry = commands.add_parser(
        "registry",
        help="load, show or switch the registry: of the running local stack, or with --aws of "
        "a deployed stage",
    )
    registry_commands = registry.add_subparsers(dest="action", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--aws",
        action="store_true",
        help="act on a deployed stage (needs --stage) with your AWS credentials, not on the "
        "local stack",
    )
    where.add_argument("--stage", help="with --aws: the stage whose tables to use (dev, prod)")
    where.add_argument("--region", help="with --aws: the stage's region (default: AWS config)")
    where.add_argument(
        "--state-file",
        help="the local stack's state file (default: the one `first-gateway dev` writes, "
        "$XDG_RUNTIME_DIR/first/stack.json or ~/.cache/first/stack.json)",
    )
    load = registry_commands.add_parser("load", parents=[where], help="validate and publish")
    load.add_argument("file")
    registry_commands.add_parser("show", parents=[where], help="print the published registry")
    maintenance = registry_commands.add_parser(
        "maintenance",
        parents=[where],
        help="put a cluster in maintenance (on) or take it out (off)",
    )
    maintenance.add_argument("cluster")
    maintenance.add_argument("state", choices=["on", "off"])
    registry.set_defaults(run=_registry)

    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
