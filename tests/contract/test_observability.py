"""Structured logs and CloudWatch metrics from the running stack (`first-gateway dev --metrics`
writes the EMF lines Lambda would turn into metrics), and no secret in them."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from first_local.globus_standin import mint_token
from tests.conftest import CALLBACK_SECRET
from tests.contract.conftest import Stack

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


def metric_lines(stack: Stack) -> list[dict[str, Any]]:
    lines = Path(stack.state["log"]).read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith('{"_aws"')]


def find(stack: Stack, name: str, **dimensions: str) -> list[dict[str, Any]]:
    """The EMF lines for metric `name` whose dimensions include these values."""
    found = []
    for line in metric_lines(stack):
        declared = line["_aws"]["CloudWatchMetrics"][0]
        if declared["Namespace"] != "FIRST" or declared["Metrics"][0]["Name"] != name:
            continue
        if all(str(line.get(key)) == value for key, value in dimensions.items()):
            found.append(line)
    return found


def eventually(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def test_requests_refusals_and_callbacks_become_metrics(stack: Stack) -> None:
    token = mint_token("alice")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=token, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "count me"}], max_tokens=4
    )
    request_id = raw.headers["x-first-request-id"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)

    ok = eventually(lambda: find(stack, "Requests", Route="chat/completions", Outcome="ok"))
    assert ok and ok[-1]["Requests"] == [1.0] and ok[-1]["stage"] == "local"
    assert eventually(lambda: find(stack, "Refused", Status="400"))
    timings = find(stack, "RequestMs", Route="chat/completions")
    assert timings and timings[-1]["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"] == (
        "Milliseconds"
    )
    assert eventually(lambda: find(stack, "Callbacks", Kind="result", Outcome="accepted"))

    # A forged callback is counted as refused, by its status.
    httpx.post(
        f"{stack.base_url}/callbacks/{request_id}",
        json={"request_id": request_id, "status_code": 200, "body": {}},
        headers={"Authorization": "Bearer forged"},
    )
    assert eventually(lambda: find(stack, "Callbacks", Kind="result", Outcome="401"))

    # Nothing secret reached the log: not the user's token, not the request's callback token.
    text = Path(stack.state["log"]).read_text(errors="replace")
    callback_token = hmac.new(
        CALLBACK_SECRET.encode(), request_id.encode(), hashlib.sha256
    ).hexdigest()
    assert token not in text and token.split(".")[-1] not in text
    assert callback_token not in text and CALLBACK_SECRET not in text
