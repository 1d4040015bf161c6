"""Batch input lines and files."""

from __future__ import annotations

import json
from typing import Any

from tests.support.registry import MODEL


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
