"""Token usage: read from vLLM's answers, recorded once per request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_body(cls, body: Any) -> Usage | None:
        """The `usage` object of an OpenAI-shaped answer, if it has one."""
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            return None
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        return cls(prompt, completion, int(usage.get("total_tokens") or prompt + completion))
