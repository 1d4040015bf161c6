"""The real local stack, started once per test session as `first-gateway dev` in a child
process, and clients for the dev identities."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import openai
import pytest

from first_local.globus_standin import mint_token
from first_local.stack import free_port
from tests.conftest import CALLBACK_SECRET, PROJECT_ROOT

# Short, so the 504 path is testable; a normal request answers in milliseconds.
RESULT_WAIT_SECONDS = 4.0


@dataclass
class Stack:
    base_url: str
    state: dict[str, Any]

    def client(
        self,
        user: str = "alice",
        *,
        federated: bool = True,
        cluster: str = "sophia",
        **token_options: Any,
    ) -> openai.OpenAI:
        base = (
            f"{self.base_url}/v1"
            if federated
            else (f"{self.base_url}/resource_server/v1/{cluster}/vllm/v1")
        )
        return openai.OpenAI(
            base_url=base, api_key=mint_token(user, **token_options), max_retries=0
        )

    def table(self, name: str) -> Any:
        dynamodb = boto3.resource(
            "dynamodb", endpoint_url=self.state["aws_endpoint_url"], region_name="us-east-1"
        )
        return dynamodb.Table(f"first-local-{name}")

    def item(self, table: str, request_id: str) -> dict[str, Any] | None:
        response = self.table(table).get_item(Key={"request_id": request_id}, ConsistentRead=True)
        return response.get("Item")

    def standin_calls(self) -> dict[str, int]:
        with urllib.request.urlopen(self.state["standin_calls_url"]) as response:
            return dict(json.load(response))


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    port = free_port()
    state_file = tmp_path_factory.mktemp("stack") / "stack.json"
    log = open(state_file.with_suffix(".log"), "wb")  # noqa: SIM115
    env = {
        **os.environ,
        "FIRST_CALLBACK_SECRET": CALLBACK_SECRET,
        "FIRST_TABLE_PREFIX": "first-local-",
    }
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("first-gateway")),
            "dev",
            "--port",
            str(port),
            "--state-file",
            str(state_file),
            "--result-wait",
            str(RESULT_WAIT_SECONDS),
            "--workers",
            "3",
        ],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the stack exited: {state_file.with_suffix('.log').read_text()}")
        try:
            urllib.request.urlopen(f"{base_url}/health", timeout=2)
            if state_file.exists():
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the local stack did not come up in 180 s")
        time.sleep(0.2)
    try:
        yield Stack(base_url, json.loads(state_file.read_text()))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
