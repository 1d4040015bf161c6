"""The whole gateway on one machine with no cloud account.

A small supervised set: a moto server (DynamoDB, S3) and the stand-ins (Globus Auth/Groups,
mock vLLM) run as child processes; this process configures the gateway through its ordinary
settings, creates the tables and bucket, loads the registry, starts a local compute pool per
endpoint and serves every route on one port.
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
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOCAL_REGISTRY = PROJECT_ROOT / "infra" / "registry" / "local.yaml"


@dataclass
class StackOptions:
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
    # The reconciler's period (0: not run) and grace period (first_core.reconciler).
    reconcile_every: float = 5.0
    reconcile_grace: float = 10.0
    # Fault injection (first_local.faults), all off by default.
    drop_callbacks: float = 0.0
    duplicate_callbacks: float = 0.0
    delay_callbacks: float = 0.0
    fail_compute: float = 0.0
    throttle_writes: float = 0.0
    # Where to write the addresses of the running stack (for tests and operator commands).
    state_file: Path | None = None
    # Join a running stack (its state file): use its moto server, Globus stand-in and backend,
    # whose tables and registry are already there; start only another gateway process with its
    # own compute pool. Several gateways on one DynamoDB, as several Lambda instances are.
    join: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # The health poller (first_core.health.poll) in a background thread, every this many
    # seconds (0: never); the first poll runs before the gateway answers.
    health_every: float = 10.0
    # Compute endpoints whose local pool is stopped from the start, as when a cluster's
    # endpoint is down (tests: requests must go elsewhere).
    stop_endpoints: list[str] = field(default_factory=list)
    # The clusters' file system as the local batch function sees it: FIRST batches read their
    # input paths and write their outputs under it (a temporary directory if not given).
    cluster_fs: Path | None = None
    # CloudWatch EMF metric lines on stdout, as on Lambda (first_core.observability); off by
    # default so the console stays readable.
    metrics: bool = False


def free_port() -> int:
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
    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.children: list[subprocess.Popen[bytes]] = []
        self.base_url = f"http://{options.host}:{options.port}"
        if options.join is not None:
            from urllib.parse import urlsplit

            joined = json.loads(options.join.read_text())
            self.moto_port = int(urlsplit(joined["aws_endpoint_url"]).port or 0)
            self.auth_port = int(urlsplit(joined["globus_auth_url"]).port or 0)
            self.vllm_port = 0
            self.backend_url = options.backend_url or joined["backend_url"]
            return
        self.moto_port = free_port()
        self.auth_port = free_port()
        self.vllm_port = 0 if options.backend_url else free_port()
        self.backend_url = options.backend_url or f"http://127.0.0.1:{self.vllm_port}/v1"

    def gateway_env(self) -> dict[str, str]:
        """The settings of the gateway, exactly the variables the template sets on AWS."""
        from first_local.globus_standin import (
            ADMIN_GROUP_ID,
            ALLOWED_GROUP_ID,
            DEV_CLIENT_ID,
            DEV_CLIENT_SECRET,
            DEV_GATEWAY_SCOPE,
        )

        auth = f"http://127.0.0.1:{self.auth_port}"
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "FIRST_STAGE": "local",
            "FIRST_AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.moto_port}",
            "FIRST_GLOBUS_CLIENT_ID": DEV_CLIENT_ID,
            "FIRST_GLOBUS_CLIENT_SECRET": DEV_CLIENT_SECRET,
            "FIRST_GATEWAY_SCOPE": DEV_GATEWAY_SCOPE,
            "FIRST_ALLOWED_DOMAINS": json.dumps(["anl.gov", "uchicago.edu"]),
            "FIRST_ALLOWED_GROUPS": json.dumps([ALLOWED_GROUP_ID]),
            "FIRST_ADMIN_GROUPS": json.dumps([ADMIN_GROUP_ID]),
            "FIRST_PUBLIC_BASE_URL": self.base_url,
            # Tests pass their own secret so they can forge and replay callbacks on purpose.
            "FIRST_CALLBACK_SECRET": os.environ.get("FIRST_CALLBACK_SECRET")
            or secrets.token_hex(32),
            "FIRST_COMPUTE_BACKEND": "local",
            "FIRST_RESULT_WAIT_SECONDS": str(self.options.result_wait_seconds),
            "FIRST_RECONCILE_GRACE_SECONDS": str(self.options.reconcile_grace),
            "POWERTOOLS_METRICS_DISABLED": "false" if self.options.metrics else "true",
            "GLOBUS_SDK_SERVICE_URL_AUTH": f"{auth}/auth/",
            "GLOBUS_SDK_SERVICE_URL_GROUPS": f"{auth}/groups/",
            **self.options.extra_env,
        }

    def start_children(self) -> None:
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
        self._spawn(services)
        _wait_http(f"http://127.0.0.1:{self.moto_port}/moto-api/")
        _wait_http(f"http://127.0.0.1:{self.auth_port}/_standin/calls")
        if self.vllm_port:
            _wait_http(f"http://127.0.0.1:{self.vllm_port}/health")

    def _spawn(self, command: list[str], quiet: bool = False) -> None:
        # moto logs every request on stderr; the stand-ins only warn.
        stderr = subprocess.DEVNULL if quiet else None
        child = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=_die_with_parent
        )
        self.children.append(child)

    def provision(self) -> None:
        """Tables and bucket as template.yaml declares them, then the registry."""
        import boto3

        from first_core.registry import load_file, publish
        from first_core.settings import get_settings
        from first_local.provision import TEMPLATE, create_bucket, create_tables_from_template

        settings = get_settings()
        where = {"region_name": settings.aws_region, "endpoint_url": settings.aws_endpoint_url}
        create_tables_from_template(
            boto3.client("dynamodb", **where), TEMPLATE, settings.table_prefix
        )
        create_bucket(boto3.client("s3", **where), TEMPLATE, settings.results_bucket)
        publish(load_file(self.options.registry))

    def start_compute(self) -> None:
        from first_core.compute import LocalComputeBackend, set_backend
        from first_core.registry import Registry
        from first_local.faults import CallbackFaultProxy, CallbackFaults

        o = self.options
        self.cluster_fs = (o.cluster_fs or Path(tempfile.mkdtemp(prefix="first-cluster-fs-")))
        self.cluster_fs = self.cluster_fs.resolve()
        from first_local.globus_standin import DEV_IDENTITIES

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
        if o.fail_compute:
            worker_env["FIRST_LOCAL_FAIL_COMPUTE"] = str(o.fail_compute)
        faults = CallbackFaults(o.drop_callbacks, o.duplicate_callbacks, o.delay_callbacks)
        callback_base_url = None
        if faults.active:
            self.fault_proxy = CallbackFaultProxy(self.base_url, faults).start()
            callback_base_url = self.fault_proxy.url
        backend = LocalComputeBackend(
            worker_env, workers_per_endpoint=o.workers, callback_base_url=callback_base_url
        )
        endpoints = Registry.current().endpoints
        batch_only = {e.batch_endpoint_id for e in endpoints if e.batch_endpoint_id}
        for endpoint_id in sorted({e.endpoint_id for e in endpoints} | batch_only):
            if endpoint_id in self.options.stop_endpoints:
                backend.stop_endpoint(endpoint_id)
            else:
                # A batch queue runs few long tasks: two workers are plenty on one machine.
                workers = 2 if endpoint_id in batch_only else None
                backend.start_endpoint(endpoint_id, workers=workers)
        set_backend(backend)
        self.compute = backend

    def start_reconciler(self) -> None:
        """The scheduled reconciler and batch driver, as a thread of this process (the compute
        pool lives here; each gateway process looks after its own pool's tasks)."""
        import logging
        import threading

        every = self.options.reconcile_every
        if every <= 0:
            return
        self._reconciler_stop = threading.Event()

        def loop() -> None:
            from first_core.batch_driver import drive
            from first_core.reconciler import reconcile

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

        from first_core.health import poll

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

        os.environ.update(self.gateway_env())
        # Log and metric lines reach a file (tests, --state-file users) as they are written.
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        # A plain SIGTERM would skip `finally` and leave the children running.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        try:
            if self.options.join is None:
                self.start_children()
                self.provision()
            else:
                _wait_http(f"http://127.0.0.1:{self.moto_port}/moto-api/")
            self.start_compute()
            self.start_reconciler()
            if self.options.join is None:
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
            if callable(on_ready):
                on_ready(self)
            server.run()
        finally:
            self.stop()

    def write_state(self) -> None:
        if self.options.state_file is None:
            return
        self.options.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.options.state_file.write_text(
            json.dumps(
                {
                    "base_url": self.base_url,
                    "aws_endpoint_url": f"http://127.0.0.1:{self.moto_port}",
                    "globus_auth_url": f"http://127.0.0.1:{self.auth_port}/auth/",
                    "globus_groups_url": f"http://127.0.0.1:{self.auth_port}/groups/",
                    "standin_calls_url": f"http://127.0.0.1:{self.auth_port}/_standin/calls",
                    "backend_url": self.backend_url,
                    "cluster_fs": str(self.cluster_fs),
                    "pid": os.getpid(),
                },
                indent=2,
            )
        )

    def stop(self) -> None:
        reconciler_stop = getattr(self, "_reconciler_stop", None)
        if reconciler_stop is not None:
            reconciler_stop.set()
        proxy = getattr(self, "fault_proxy", None)
        if proxy is not None:
            proxy.stop()
        health_stop = getattr(self, "_health_stop", None)
        if health_stop is not None:
            health_stop.set()
        compute = getattr(self, "compute", None)
        if compute is not None:
            compute.shutdown()
        for child in self.children:
            child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=5)
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
    state_file = Path(tempfile.mkdtemp(prefix="first-stack-")) / "stack.json"
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
        env={**os.environ, **(env or {})},
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
