"""The real local stack, started once per test session as `first-gateway dev` in a child
process, and clients for the dev identities."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import openai
import pytest

from first_local.globus_standin import mint_token
from first_local.stack import stack_process
from tests.conftest import CALLBACK_SECRET

# The test process knows the callback secret, so tests can sign (and forge) callbacks.
STACK_ENV = {
    "FIRST_CALLBACK_SECRET": CALLBACK_SECRET,
    "FIRST_TABLE_PREFIX": "first-local-",
    # Batch outputs above 200 KB are answered with a redirect to S3, as 4 MB+ ones are on AWS,
    # so the 1,000-line batch's output takes that path and small files the inline one.
    "FIRST_FILE_INLINE_BYTES": "200000",
}
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

    def compute_standin(self, path: str, method: str = "GET") -> Any:
        """A `/_standin/...` answer of the Globus Compute stand-in."""
        url = self.state["globus_compute_url"] + path
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return json.load(r)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log = tmp_path_factory.mktemp("stack") / "stack.log"
    with stack_process(
        "--result-wait",
        str(RESULT_WAIT_SECONDS),
        "--workers",
        "3",
        "--metrics",
        # Globus Compute's API limit has tests of its own (test_globus_compute.py).
        "--compute-api-limit",
        "0",
        env=STACK_ENV,
        log=log,
    ) as state:
        yield Stack(state["base_url"], {**state, "log": str(log)})
