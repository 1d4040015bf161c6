"""What the contract tests share: reading the local stack's tables and driving batches with the
real `openai` package."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
from boto3.dynamodb.conditions import Attr, Key

from first_local.globus_standin import mint_token
from tests.contract.conftest import Stack

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
ENDED = ("completed", "failed", "cancelled", "expired")


def line(custom_id: str, text: str, max_tokens: int = 8, **body: Any) -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": max_tokens,
                **body,
            },
        }
    )


def jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def upload(client: openai.OpenAI, lines: list[str], name: str = "input.jsonl") -> Any:
    return client.files.create(file=(name, jsonl(lines)), purpose="batch")


def start(client: openai.OpenAI, lines: list[str], **options: Any) -> Any:
    file = upload(client, lines)
    return client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        **options,
    )


def wait_for(
    client: openai.OpenAI, batch_id: str, until: Any = None, timeout: float = 120.0
) -> Any:
    """Poll the batch until `until(batch)` (default: it ended)."""
    until = until or (lambda b: b.status in ENDED)
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"{batch_id} stuck: {batch}"
        time.sleep(0.25)


def rows(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x]


def user_id(stack: Stack, user: str) -> str:
    response = httpx.get(
        f"{stack.base_url}/resource_server/v1/whoami",
        headers={"authorization": f"Bearer {mint_token(user)}"},
    )
    return str(response.json()["user_id"])


def counter(stack: Stack, key: str, attribute: str = "used") -> int:
    item = stack.table("rate_counters").get_item(Key={"key": key}, ConsistentRead=True)
    return int(item.get("Item", {}).get(attribute, 0))


def requests_counted(stack: Stack, user_id: str, model: str, second: int) -> int:
    """A user's requests of a model in the one-second window starting then: in the minute's
    `tpm#` row beside the tokens (first_core.ratelimit), or in an `rps#` row of their own."""
    folded = counter(stack, f"tpm#{user_id}#{model}#{second // 60}", f"requests_{second}")
    return folded + counter(stack, f"rps#{user_id}#{model}#{second}")


def scan_all(stack: Stack, table: str, condition: Any) -> list[dict[str, Any]]:
    """Every row of one of the stack's tables that meets `condition` (all pages)."""
    rows: list[dict[str, Any]] = []
    options: dict[str, Any] = {"FilterExpression": condition, "ConsistentRead": True}
    while True:
        page = stack.table(table).scan(**options)
        rows += page["Items"]
        if "LastEvaluatedKey" not in page:
            return rows
        options["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def usage_rows(stack: Stack, request_id: str) -> list[dict[str, Any]]:
    """A request's usage records (exactly one once it has ended)."""
    return scan_all(stack, "usage", Attr("request_id").eq(request_id))


def snapshot(stack: Stack, request_id: str) -> dict[str, Any]:
    """Everything a request's callbacks could change."""
    chunks = stack.table("stream_chunks").query(
        KeyConditionExpression=Key("request_id").eq(request_id), ConsistentRead=True
    )["Items"]
    return {
        "request": stack.item("requests", request_id),
        "chunks": chunks,
        "usage": usage_rows(stack, request_id),
    }


def the_usage_row(stack: Stack, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """A request's one usage record, once written: it follows the update that ends the record
    (and with it the answer the client already has), so it is waited for, never assumed."""
    wait_until_ended(stack, request_id, timeout)
    deadline = time.monotonic() + timeout
    while not (found := usage_rows(stack, request_id)):
        assert time.monotonic() < deadline, f"{request_id} ended with no usage record"
        time.sleep(0.1)
    assert len(found) == 1, found
    return found[0]


def wait_until_ended(stack: Stack, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The request's record once it has ended."""
    deadline = time.monotonic() + timeout
    while True:
        item = stack.item("requests", request_id)
        if item and item["status"] in ("completed", "failed", "cancelled", "timed_out"):
            return item
        assert time.monotonic() < deadline, f"{request_id} never ended: {item}"
        time.sleep(0.2)
