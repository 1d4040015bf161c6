"""Batches as the tests make them: input lines and files, the registry a batch test runs on,
and the calls a cluster's batch function makes back (through the real callback sink)."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from first_core.batches import callbacks as batch_callbacks
from first_core.batches import files, lifecycle
from first_core.callbacks import callback_token
from first_core.registry import (
    ClusterConfig,
    EndpointConfig,
    FunctionIds,
    Limits,
    RegistryFile,
    publish,
)
from first_core.settings import get_settings
from first_core.tables import BatchRecord, FileRecord, UsageRecord
from tests.support.identities import CALLER
from tests.support.registry import (
    EMBEDDER,
    MODEL,
    REGISTERED_FUNCTIONS,
    SOPHIA_BATCH_ENDPOINT,
    SOPHIA_ENDPOINT,
)

INFERENCE = REGISTERED_FUNCTIONS["inference"]
BATCH_FUNCTION = REGISTERED_FUNCTIONS["batch"]
BATCH_ENDPOINT = SOPHIA_BATCH_ENDPOINT
MAX_TOKENS = 4096


def chat_line(custom_id: str = "r1", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body},
    }


def jsonl(*lines: Any) -> bytes:
    """Each item a JSON line; a str item is written as is (blank lines, broken JSON)."""
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode()


def batch_file(n: int = 2) -> bytes:
    return jsonl(*(chat_line(f"r{i}") for i in range(n)))


def publish_batch_registry() -> None:
    """sophia with MODEL (batches on, through BATCH_ENDPOINT, MAX_TOKENS) and EMBEDDER (none)."""
    publish(
        RegistryFile(
            clusters={
                "sophia": ClusterConfig(
                    frameworks=["vllm"],
                    endpoints=[
                        EndpointConfig(
                            framework="vllm",
                            models=[MODEL],
                            endpoint_id=SOPHIA_ENDPOINT,
                            functions=FunctionIds(inference=INFERENCE, batch=BATCH_FUNCTION),
                            limits=Limits(max_tokens=MAX_TOKENS),
                            batches=True,
                            batch_endpoint_id=BATCH_ENDPOINT,
                        ),
                        EndpointConfig(
                            framework="vllm",
                            models=[EMBEDDER],
                            endpoint_id="0c0ffee0-0000-4000-8000-0000000000e2",
                            functions=FunctionIds(inference=INFERENCE),
                        ),
                    ],
                )
            }
        )
    )


def upload(content: bytes | None = None, caller: Any = CALLER) -> FileRecord:
    view = files.create(caller, files.Upload("in.jsonl", "batch", content or batch_file(3)))
    return FileRecord.get(view["id"], consistent_read=True)


def create(file_id: str, endpoint: str = "/v1/chat/completions", caller: Any = CALLER) -> str:
    body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
    return lifecycle.create_openai(caller, json.dumps(body).encode()).batch_id


def load(batch_id: str) -> BatchRecord:
    return BatchRecord.get(batch_id, consistent_read=True)


def slots() -> int:
    return lifecycle.slots_in_use(CALLER.user_id)


def usage_rows(batch_id: str) -> list[UsageRecord]:
    return [row for row in UsageRecord.scan() if row.request_id == batch_id]


def event(batch_id: str, kind: str, attempt: int = 1, **fields: Any) -> dict[str, Any]:
    return {"batch_id": batch_id, "event": kind, "attempt": attempt, **fields}


def call_back(batch_id: str, kind: str, attempt: int = 1, **fields: Any) -> dict[str, Any]:
    body = json.dumps(event(batch_id, kind, attempt, **fields)).encode()
    return batch_callbacks.accept_callback(batch_id, f"Bearer {callback_token(batch_id)}", body)


def send(batch_id: str, body: dict[str, Any]) -> dict[str, Any]:
    raw = json.dumps(body).encode()
    return batch_callbacks.accept_callback(batch_id, f"Bearer {callback_token(batch_id)}", raw)


def done_report(
    batch_id: str, attempt: int = 1, outcome: str = "completed", **fields: Any
) -> dict[str, Any]:
    fields.setdefault("completed", 0)
    return event(batch_id, "done", attempt, outcome=outcome, **fields)


def url_key(url: str) -> str:
    """The object key a presigned URL names (path-style or virtual-host style)."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path).lstrip("/")
    bucket = get_settings().results_bucket
    return path[len(bucket) + 1 :] if path.startswith(bucket + "/") else path


def is_signed(url: str) -> bool:
    """Signed with SigV4 (S3 refuses SigV2 for buckets made since 2020)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    return query.get("X-Amz-Algorithm") == ["AWS4-HMAC-SHA256"] and "X-Amz-Signature" in query
