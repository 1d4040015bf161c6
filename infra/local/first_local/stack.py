"""The whole gateway on one machine with no cloud account.

A small supervised set: a moto server (DynamoDB, S3), the stand-ins of Globus Auth/Groups and of
the Globus Compute service (whose endpoints run tasks in the real `globus-compute-endpoint`
engine), and the mock vLLM run as child processes. This process configures the gateway through
its ordinary settings, registers `compute_funcs` with the Compute stand-in through the real SDK,
creates the tables and bucket, publishes the registry with the function ids it got, and serves
every route on one port.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compute_funcs import FUNCTIONS
from first_local.faults import CallbackFaultProxy, CallbackFaults

if TYPE_CHECKING:
    from first_core.registry import RegistryFile

PROJECT_ROOT = Path(__file__).resolve().parents[3]
LOCAL_REGISTRY = PROJECT_ROOT / "infra" / "registry" / "local.yaml"
# Stands for the function ids while the registry file is checked, before registration.
UNREGISTERED_FUNCTIONS = {name: "00000000-0000-0000-0000-000000000000" for name in FUNCTIONS}
# The local direct backend (infra/registry/local.yaml): the registry names these variables, the
# stack sets them. The key is the gateway's for that upstream (its mock checks it); one in the
# environment wins, so a stack can be started holding a wrong key.
DIRECT_URL_VARIABLE = "FIRST_LOCAL_DIRECT_URL"
DIRECT_KEY_VARIABLE = "FIRST_LOCAL_DIRECT_KEY"
DIRECT_DEV_KEY = "first-local-direct-upstream-key-not-for-production"


@dataclass
class StackOptions:
    """How `first-gateway dev` runs the stack: ports, backend, registry, workers, and the fault
    switches."""

    host: str = "127.0.0.1"
    port: int = 8000
    backend_url: str | None = None  # any OpenAI-compatible server instead of the mock
    backend_api_key: str | None = None
    registry: Path = LOCAL_REGISTRY
    workers: int = 4
    mock_delay: float = 0.0
    mock_token_rate: float = 0.0
    backend_errors: float = 0.0
    backend_hang: float = 0.0
    result_wait_seconds: float = 300.0
    # The reconciler's period (0: not run) and grace period (first_core.inference.reconciler).
    reconcile_every: float = 5.0
    reconcile_grace: float = 10.0
    # Fault injection (first_local.faults), all off by default.
    drop_callbacks: float = 0.0
    duplicate_callbacks: float = 0.0
    delay_callbacks: float = 0.0
    fail_compute: float = 0.0
    kill_workers: float = 0.0
    # A fraction of the submitter's batches that die after sending (first_local.queue_source).
    kill_submitter: float = 0.0
    throttle_writes: float = 0.0
    # Globus Compute's API limit per client identity, as `N/S` (the service's 20/10), or "0".
    compute_api_limit: str = "20/10"
    # Every endpoint is online with no workers for this long after the gateway first answers
    # /health (its batch job still queued): the `starting` state. None: workers from the start.
    endpoint_start_delay: float | None = None
    # Where to write the addresses of the running stack (for tests and operator commands).
    state_file: Path | None = None
    # Join a running stack (its state file): use its moto server, Globus stand-ins and backend,
    # whose tables and registry are already there; start only another gateway process. Several
    # gateways on one DynamoDB and one Globus Compute, as several Lambda instances are.
    join: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # The health poller (first_core.registry.health.poll) in a background thread, every this many
    # seconds (0: never); the first poll runs before the gateway answers.
    health_every: float = 10.0
    # Compute endpoints (ids, or cluster names for all of a cluster's) that are offline from the
    # start, as when a cluster's endpoint is down: tasks sent there wait for it.
    stop_endpoints: list[str] = field(default_factory=list)
    # The clusters' file system as the local batch function sees it: FIRST batches read their
    # input paths and write their outputs under it (a temporary directory if not given).
    cluster_fs: Path | None = None
    # CloudWatch EMF metric lines on stdout, as on Lambda (first_core.observability); off by
    # default so the console stays readable.
    metrics: bool = False


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Ask Linux to end a child when the stack process dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up within {timeout:.0f} s") from None
            time.sleep(0.1)


class LocalStack:
    """The whole local stack: starts moto, the stand-ins, the endpoints and the gateway, writes the
    state file, and stops them all."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.children: list[subprocess.Popen[bytes]] = []
        self.base_url = f"http://{options.host}:{options.port}"
        self.compute_endpoints: dict[str, str]  # cluster → the endpoint of its interactive work
        self.fault_proxy: CallbackFaultProxy | None = None
        faults = CallbackFaults(
            options.drop_callbacks, options.duplicate_callbacks, options.delay_callbacks
        )
        if faults.active:
            # Callbacks reach the gateway through the fault proxy: it is their public address.
            self.fault_proxy = CallbackFaultProxy(self.base_url, faults)
        if options.join is not None:
            from urllib.parse import urlsplit

            joined = json.loads(options.join.read_text())
            self.moto_port = int(urlsplit(joined["aws_endpoint_url"]).port or 0)
            self.auth_port = int(urlsplit(joined["globus_auth_url"]).port or 0)
            self.compute_port = int(urlsplit(joined["globus_compute_url"]).port or 0)
            self.vllm_port = 0
            self.direct_port = 0
            self.direct_url = str(joined.get("direct_url", ""))
            self.backend_url = options.backend_url or joined["backend_url"]
            self.cluster_fs = Path(joined["cluster_fs"])
            self.compute_endpoints = dict(joined["compute_endpoints"])
            # The joined stack's Globus Compute limit, so both gateways budget alike.
            options.compute_api_limit = joined.get("compute_api_limit", options.compute_api_limit)
            return
        self.moto_port = free_port()
        self.auth_port = free_port()
        self.compute_port = free_port()
        self.vllm_port = 0 if options.backend_url else free_port()
        # The direct backend's upstream is the stack's own, whatever --backend-url names.
        self.direct_port = free_port()
        self.direct_url = f"http://127.0.0.1:{self.direct_port}/v1"
        self.backend_url = options.backend_url or f"http://127.0.0.1:{self.vllm_port}/v1"
        self.cluster_fs = (options.cluster_fs or Path(tempfile.mkdtemp(prefix="first-cluster-fs-")))
        self.cluster_fs = self.cluster_fs.resolve()
        self.compute_endpoints = {}

    def gateway_env(self) -> dict[str, str]:
        """The settings of the gateway, exactly the variables the template sets on AWS."""
        from first_local.globus_standin import (
            ADMIN_GROUP_ID,
            ALLOWED_GROUP_ID,
            DEV_CLIENT_ID,
            DEV_CLIENT_SECRET,
            DEV_GATEWAY_SCOPE,
            DEV_NATIVE_CLIENT_ID,
            DEV_SERVICE_CLIENT_ID,
        )

        auth = f"http://127.0.0.1:{self.auth_port}"
        callbacks_to = self.fault_proxy.url if self.fault_proxy else self.base_url
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "FIRST_STAGE": "local",
            "FIRST_AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.moto_port}",
            "FIRST_GLOBUS_CLIENT_ID": DEV_CLIENT_ID,
            "FIRST_GLOBUS_CLIENT_SECRET": DEV_CLIENT_SECRET,
            "FIRST_GATEWAY_SCOPE": DEV_GATEWAY_SCOPE,
            # The dashboard signs in through the stand-in's dev native app (as first-auth does).
            "FIRST_NATIVE_CLIENT_ID": DEV_NATIVE_CLIENT_ID,
            "FIRST_ALLOWED_DOMAINS": json.dumps(["anl.gov", "uchicago.edu"]),
            "FIRST_ALLOWED_GROUPS": json.dumps([ALLOWED_GROUP_ID]),
            "FIRST_ADMIN_GROUPS": json.dumps([ADMIN_GROUP_ID]),
            "FIRST_PUBLIC_BASE_URL": callbacks_to,
            # Tests pass their own secret so they can forge and replay callbacks on purpose.
            "FIRST_CALLBACK_SECRET": os.environ.get("FIRST_CALLBACK_SECRET")
            or secrets.token_hex(32),
            "FIRST_RESULT_WAIT_SECONDS": str(self.options.result_wait_seconds),
            "FIRST_RECONCILE_GRACE_SECONDS": str(self.options.reconcile_grace),
            "POWERTOOLS_METRICS_DISABLED": "false" if self.options.metrics else "true",
            "GLOBUS_SDK_SERVICE_URL_AUTH": f"{auth}/auth/",
            "GLOBUS_SDK_SERVICE_URL_GROUPS": f"{auth}/groups/",
            # Globus Compute: the gateway's client identity, as on AWS, and the stand-in.
            "GLOBUS_COMPUTE_CLIENT_ID": DEV_CLIENT_ID,
            "GLOBUS_COMPUTE_CLIENT_SECRET": DEV_CLIENT_SECRET,
            "GLOBUS_SDK_SERVICE_URL_COMPUTE": self.compute_url,
            # The SDK keeps its token in a SQLite file here: one per gateway process.
            "GLOBUS_COMPUTE_USER_DIR": tempfile.mkdtemp(prefix="first-globus-compute-"),
            # The dev pipeline's client identity may call the gateway as a service account.
            "FIRST_SERVICE_ACCOUNTS": json.dumps([DEV_SERVICE_CLIENT_ID]),
            # Globus Compute's API budget, within the stand-in's limit (compute/budget.py), and the
            # queue of requests it cannot submit at once. A budget in the environment wins
            # (0: none, every request submitted at once: how the gateway worked before).
            **self._budget_env(),
            "FIRST_SUBMIT_QUEUE_URL": self.submit_queue_url,
            # The local submitter runs for well under a second; a stale claim is one it lost.
            "FIRST_SUBMIT_CLAIM_SECONDS": "5",
            DIRECT_URL_VARIABLE: self.direct_url,
            DIRECT_KEY_VARIABLE: os.environ.get(DIRECT_KEY_VARIABLE) or DIRECT_DEV_KEY,
            **self.options.extra_env,
        }

    @property
    def compute_url(self) -> str:
        return f"http://127.0.0.1:{self.compute_port}"

    @property
    def submit_queue_url(self) -> str:
        # moto's account id, and the name the template gives the queue for the stage `local`.
        return f"http://127.0.0.1:{self.moto_port}/123456789012/first-local-submit"

    def _budget_env(self) -> dict[str, str]:
        from first_local.compute_standin.limits import ApiLimit

        calls, window = ApiLimit.parse(self.options.compute_api_limit).budget()
        variables = {
            "FIRST_COMPUTE_API_CALLS_PER_WINDOW": str(calls),
            "FIRST_COMPUTE_API_WINDOW_SECONDS": str(window or 1.0),
        }
        return {name: os.environ.get(name, value) for name, value in variables.items()}

    def start_children(self, registry: RegistryFile) -> None:
        python = sys.executable
        moto = [python, "-m", "first_local.moto_server", "--port", str(self.moto_port)]
        if self.options.throttle_writes:
            moto += ["--throttle-writes", str(self.options.throttle_writes)]
        self._spawn(moto)
        services = [python, "-m", "first_local.services", "--auth-port", str(self.auth_port)]
        o = self.options
        if self.vllm_port:
            services += [
                "--vllm-port",
                str(self.vllm_port),
                "--mock-delay",
                str(o.mock_delay),
                "--mock-token-rate",
                str(o.mock_token_rate),
                "--backend-errors",
                str(o.backend_errors),
                "--backend-hang",
                str(o.backend_hang),
            ]
        services += [
            "--direct-port",
            str(self.direct_port),
            "--direct-api-key",
            os.environ.get(DIRECT_KEY_VARIABLE) or DIRECT_DEV_KEY,
        ]
        self._spawn(services)
        config = self._write_compute_config(registry)
        self._spawn(
            [
                python,
                "-m",
                "first_local.compute_standin",
                "--port",
                str(self.compute_port),
                "--config",
                str(config),
            ]
        )
        _wait_http(f"http://127.0.0.1:{self.moto_port}/moto-api/")
        _wait_http(f"http://127.0.0.1:{self.auth_port}/_standin/calls")
        if self.vllm_port:
            _wait_http(f"http://127.0.0.1:{self.vllm_port}/health")
        _wait_http(f"http://127.0.0.1:{self.direct_port}/health")
        # Its engines' workers start (and warm up) before it opens its port.
        _wait_http(f"{self.compute_url}/_standin/calls", timeout=180)

    def _write_compute_config(self, registry: RegistryFile) -> Path:
        """The Compute stand-in's endpoints (one per endpoint id of the registry) and what their
        workers see: the clusters' environment, as an endpoint's config would set it."""
        from first_local.globus_standin import DEV_IDENTITIES

        o = self.options
        for identity in DEV_IDENTITIES.values():  # each dev user's own directory, ready to use
            (self.cluster_fs / identity.username).mkdir(parents=True, exist_ok=True)
        worker_env = {
            "VLLM_BASE_URL": self.backend_url,
            # The batch function (compute_funcs/batch.py) as a cluster's endpoint would run it:
            # requests through the served vLLM, checkpoints in its scratch, paths under one root.
            "FIRST_BATCH_RUNNER": "http",
            # Each user's FIRST batches read and write only their own directory.
            "FIRST_BATCH_ROOTS": str(self.cluster_fs / "{user}"),
            "FIRST_BATCH_WORK_DIR": str(self.cluster_fs / ".first" / "batches"),
        }
        if o.backend_api_key:
            worker_env["VLLM_API_KEY"] = o.backend_api_key
        endpoints: dict[str, dict[str, Any]] = {}
        for name, cluster in registry.clusters.items():
            for endpoint in cluster.endpoints:
                if endpoint.endpoint_id is None:  # a direct backend: no Globus Compute endpoint
                    continue
                self.compute_endpoints.setdefault(name, endpoint.endpoint_id)
                endpoints.setdefault(endpoint.endpoint_id, {"name": name, "workers": o.workers})
                if endpoint.batch_endpoint_id and endpoint.batch_endpoint_id not in endpoints:
                    # A batch queue runs few long tasks: two workers are plenty on one machine.
                    endpoints[endpoint.batch_endpoint_id] = {"name": f"{name}-batch", "workers": 2}
        for endpoint_id, entry in endpoints.items():
            entry["endpoint_id"] = endpoint_id
            cluster = entry["name"].removesuffix("-batch")
            entry["stopped"] = bool(
                {endpoint_id, entry["name"], cluster} & set(o.stop_endpoints)
            )
        run_dir = Path(tempfile.mkdtemp(prefix="first-compute-"))
        config = run_dir / "standin.json"
        config.write_text(
            json.dumps(
                {
                    "endpoints": list(endpoints.values()),
                    "worker_env": worker_env,
                    "run_dir": str(run_dir),
                    "api_limit": o.compute_api_limit,
                    "fail_compute": o.fail_compute,
                    "kill_workers": o.kill_workers,
                    "start_delay": o.endpoint_start_delay,
                },
                indent=2,
            )
        )
        return config

    def _spawn(self, command: list[str], quiet: bool = False) -> None:
        # moto logs every request on stderr; the stand-ins only warn.
        stderr = subprocess.DEVNULL if quiet else None
        child = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=_die_with_parent
        )
        self.children.append(child)

    def provision(self) -> None:
        """Tables, bucket and submit queue as template.yaml declares them, then the functions
        registered with Globus Compute and the registry carrying their ids."""
        import boto3

        from compute_funcs.register import make_client, register_all
        from first_core.compute import budget
        from first_core.registry import load_file, publish
        from first_core.settings import get_settings
        from first_local.provision import (
            TEMPLATE,
            create_bucket,
            create_queue,
            create_tables_from_template,
        )

        settings = get_settings()
        where = {"region_name": settings.aws_region, "endpoint_url": settings.aws_endpoint_url}
        create_tables_from_template(
            boto3.client("dynamodb", **where), TEMPLATE, settings.table_prefix
        )
        create_bucket(boto3.client("s3", **where), TEMPLATE, settings.results_bucket)
        # A message whose submitter died comes back in seconds, not the template's 2 minutes.
        queue = create_queue(boto3.client("sqs", **where), TEMPLATE, "first-local-submit", 5)
        assert queue == settings.submit_queue_url, (queue, settings.submit_queue_url)
        # Registration is Globus Compute calls too: a version check and one per function (at
        # the submitter's priority: nothing else runs yet).
        with budget.priority(budget.Priority.SUBMITTER):
            for _ in range(len(FUNCTIONS) + 1):
                budget.spend()
        functions = register_all(make_client())
        publish(load_file(self.options.registry, functions=functions))

    def start_compute(self) -> None:
        """The gateway's Globus Compute client, made now (a token grant and a version check)
        rather than on the first request; and the fault proxy, if any."""
        from first_core.compute import get_backend

        get_backend()
        if self.fault_proxy is not None:
            self.fault_proxy.start()

    def start_submitter(self) -> None:
        """The submit queue's consumer (on AWS the submitter function behind an SQS event
        source mapping), as a thread of this process."""
        from first_local.queue_source import SubmitQueueSource

        self.submitter = SubmitQueueSource(
            self.submit_queue_url, kill=self.options.kill_submitter
        ).start()

    def start_reconciler(self) -> None:
        """The scheduled reconciler and batch driver, as a thread of this process (on AWS,
        scheduled functions; two gateway processes both running it are two overlapping runs,
        which its conditional writes make safe)."""
        import logging
        import threading

        every = self.options.reconcile_every
        if every <= 0:
            return
        self._reconciler_stop = threading.Event()

        def loop() -> None:
            from first_core.batches.driver import drive
            from first_core.inference.reconciler import reconcile

            while not self._reconciler_stop.wait(every):
                try:
                    report = reconcile()
                    if report.completed or report.failed or report.timed_out or report.errors:
                        print(f"reconciler: {json.dumps(report.to_json())}", flush=True)
                    driven = drive()
                    if driven.finalized or driven.resubmitted or driven.ended or driven.errors:
                        print(f"batch driver: {json.dumps(driven.to_json())}", flush=True)
                except Exception:
                    logging.getLogger("first.reconciler").exception("scheduled run failed")

        threading.Thread(target=loop, name="reconciler", daemon=True).start()

    def start_health_poller(self) -> None:
        """Poll once now, then every `health_every` seconds in a background thread."""
        import logging
        import threading

        from first_core.registry.health import poll

        every = self.options.health_every
        if every <= 0:
            return
        log = logging.getLogger("first.health")
        self._health_stop = threading.Event()

        def poll_once() -> None:
            try:
                poll(qstat_wait=max(5.0, every))
            except Exception:
                log.exception("health poll failed")

        def loop() -> None:
            while not self._health_stop.wait(every):
                poll_once()

        poll_once()
        threading.Thread(target=loop, name="health-poller", daemon=True).start()

    def run(self, on_ready: object = None) -> None:
        """Start everything and serve in the foreground until interrupted."""
        import uvicorn

        # Before the core is imported: its table models read their settings at import.
        os.environ.update(self.gateway_env())
        from first_core.registry import RegistryFileError, load_file

        registry = None
        if self.options.join is None:
            # The file is checked before anything starts; its function ids come at registration.
            try:
                registry = load_file(self.options.registry, functions=UNREGISTERED_FUNCTIONS)
            except RegistryFileError as error:
                raise SystemExit(str(error)) from None
        # Log and metric lines reach a file (tests, --state-file users) as they are written.
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        if self.options.metrics:
            # The metric lines go to moto's CloudWatch too, as Lambda sends them to CloudWatch.
            from first_local.metrics import mirror_to_cloudwatch

            mirror_to_cloudwatch(f"http://127.0.0.1:{self.moto_port}")
        # A plain SIGTERM would skip `finally` and leave the children running.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        try:
            if registry is not None:
                self.start_children(registry)
                self.provision()
            else:
                _wait_http(f"http://127.0.0.1:{self.moto_port}/moto-api/")
                _wait_http(f"{self.compute_url}/_standin/calls")
            self.start_compute()
            self.start_reconciler()
            if self.options.join is None:
                self.start_submitter()
                self.start_health_poller()
            self.write_state()
            from first_local.server import GatewayServer

            config = uvicorn.Config(
                GatewayServer(),
                host=self.options.host,
                port=self.options.port,
                log_level="warning",
                access_log=False,
            )
            server = uvicorn.Server(config)
            if self.options.endpoint_start_delay and self.options.join is None:
                self._workers_arrive_after_health(self.options.endpoint_start_delay)
            if callable(on_ready):
                on_ready(self)
            server.run()
        finally:
            self.stop()

    def _workers_arrive_after_health(self, delay: float) -> None:
        """`--endpoint-start-delay`: the endpoints' workers arrive `delay` seconds after the
        gateway first answers /health."""
        import threading

        def wait_then_tell() -> None:
            _wait_http(f"{self.base_url}/health", timeout=600)
            request = urllib.request.Request(
                f"{self.compute_url}/_standin/workers-arrive?in={delay}", method="POST"
            )
            urllib.request.urlopen(request, timeout=10).close()

        threading.Thread(target=wait_then_tell, name="workers-arrive", daemon=True).start()

    def state_paths(self) -> list[Path]:
        """Where this stack writes its state: `--state-file`, and the default place operator
        commands look (first_local.target) unless this is a second gateway joining a stack."""
        from first_local.target import default_state_path

        paths = [self.options.state_file] if self.options.state_file else []
        if self.options.join is None and default_state_path() not in paths:
            paths.append(default_state_path())
        return paths

    def write_state(self) -> None:
        from first_core.settings import get_settings
        from first_local.globus_standin import DEV_CLIENT_ID, DEV_CLIENT_SECRET

        text = json.dumps(
            {
                "base_url": self.base_url,
                "aws_endpoint_url": f"http://127.0.0.1:{self.moto_port}",
                "globus_auth_url": f"http://127.0.0.1:{self.auth_port}/auth/",
                "globus_groups_url": f"http://127.0.0.1:{self.auth_port}/groups/",
                "standin_calls_url": f"http://127.0.0.1:{self.auth_port}/_standin/calls",
                "globus_compute_url": self.compute_url,
                "compute_client_id": DEV_CLIENT_ID,
                "compute_client_secret": DEV_CLIENT_SECRET,
                "compute_endpoints": self.compute_endpoints,
                "compute_api_limit": self.options.compute_api_limit,
                "backend_url": self.backend_url,
                # The local direct backend's upstream (its mock's `/_standin/...` switches).
                "direct_url": self.direct_url,
                "cluster_fs": str(self.cluster_fs),
                "table_prefix": get_settings().table_prefix,
                "pid": os.getpid(),
            },
            indent=2,
        )
        for path in self.state_paths():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written whole, then renamed: a command reading it never sees half a file. 0600:
            # it holds the dev client's secret.
            partial = path.with_name(f".{path.name}.{os.getpid()}")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            partial.replace(path)
        self._state_written = True

    def remove_state(self) -> None:
        """Remove the default state file when it is still this stack's: a newer stack may have
        taken it over since. `--state-file` stays, as a record of the run for its caller."""
        from first_local.target import default_state_path

        if self.options.join is not None or not getattr(self, "_state_written", False):
            return
        path = default_state_path()
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError, AttributeError):
            pass

    def stop(self) -> None:
        self.remove_state()
        reconciler_stop = getattr(self, "_reconciler_stop", None)
        if reconciler_stop is not None:
            reconciler_stop.set()
        if self.fault_proxy is not None:
            self.fault_proxy.stop()
        health_stop = getattr(self, "_health_stop", None)
        if health_stop is not None:
            health_stop.set()
        submitter = getattr(self, "submitter", None)
        if submitter is not None:
            submitter.stop()
        for child in self.children:
            child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


@contextmanager
def stack_process(
    *options: str,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    timeout: float = 180.0,
) -> Iterator[dict[str, Any]]:
    """`first-gateway dev OPTIONS` on a free port in a session of its own, for tests and
    benchmarks: waits until it answers, yields its state (addresses of every piece), and ends
    it with all its children."""
    port = free_port()
    state_dir = Path(tempfile.mkdtemp(prefix="first-stack-"))
    state_file = state_dir / "stack.json"
    command = [
        str(Path(sys.executable).with_name("first-gateway")),
        "dev",
        "--port",
        str(port),
        "--state-file",
        str(state_file),
        *options,
    ]
    output = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        # Its default state file goes to its own directory (first_local.target), not the
        # developer's ~/.cache/first/stack.json: stacks of parallel tests stay apart.
        env={**os.environ, "FIRST_STATE_DIR": str(state_dir), **(env or {})},
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                detail = log.read_text() if log else "(no log kept)"
                raise RuntimeError(f"the local stack exited: {detail[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local stack did not come up in {timeout:.0f} s")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                if state_file.exists():
                    break
            except OSError:
                pass
            time.sleep(0.2)
        yield json.loads(state_file.read_text())
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        if log:
            output.close()  # type: ignore[union-attr]
