"""Smoke test of a deployed gateway through the official OpenAI SDK (run by `infra/smoke`).

    python infra/smoke.py BASE_URL TOKEN [--model MODEL] [--timeout SECONDS]

1. `models.list()`: the token is accepted and at least one model is served;
2. one chat completion: an answer with content and usage;
3. one streamed chat completion: content deltas arrive and the stream ends with a finish_reason.

Prints one line per step with its time; exits 1 on the first failure (naming the step and the
SDK's error), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any


class SmokeFailure(Exception):
    pass


def _step(name: str, run: Callable[[], str]) -> None:
    started = time.perf_counter()
    try:
        detail = run()
    except SmokeFailure:
        raise
    except Exception as error:  # the SDK's errors are many; each one fails the smoke test
        raise SmokeFailure(f"{name}: {type(error).__name__}: {error}") from error
    print(f"ok   {name} ({time.perf_counter() - started:.2f} s) {detail}", flush=True)


def pick_model(ids: list[str], wanted: str | None) -> str:
    if wanted:
        if wanted not in ids:
            raise SmokeFailure(f"models: {wanted!r} is not served; served: {', '.join(ids)}")
        return wanted
    chat = [i for i in ids if "embed" not in i.lower()]
    if not chat:
        raise SmokeFailure(f"models: no chat model among {ids}")
    return chat[0]


def run(base_url: str, token: str, model: str | None, timeout: float) -> None:
    from openai import OpenAI

    if not base_url.rstrip("/").endswith("/v1"):
        raise SmokeFailure(f"base URL {base_url!r} must end in /v1 (the stack's BaseUrl output)")
    client = OpenAI(base_url=base_url, api_key=token, timeout=timeout, max_retries=0)
    chosen: dict[str, str] = {}
    messages: Any = [{"role": "user", "content": "Say hello in five words."}]

    def models() -> str:
        ids = [m.id for m in client.models.list().data]
        chosen["model"] = pick_model(ids, model)
        return f"{len(ids)} models; using {chosen['model']}"

    def chat() -> str:
        reply = client.chat.completions.create(
            model=chosen["model"], messages=messages, max_tokens=32
        )
        content = reply.choices[0].message.content if reply.choices else None
        if not content:
            raise SmokeFailure(f"chat: no content in {reply.model_dump_json()[:500]}")
        usage = reply.usage.total_tokens if reply.usage else "?"
        return f"{len(content)} chars, {usage} tokens"

    def stream() -> str:
        pieces: list[str] = []
        finish = None
        first = None
        started = time.perf_counter()
        for chunk in client.chat.completions.create(
            model=chosen["model"], messages=messages, max_tokens=32, stream=True
        ):
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first or time.perf_counter()
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
        if not pieces:
            raise SmokeFailure("stream: no content deltas")
        if finish is None:
            raise SmokeFailure("stream: ended without a finish_reason")
        ttft = (first or started) - started
        return f"{len(pieces)} deltas, first after {ttft:.2f} s, finish_reason={finish}"

    _step("models", models)
    _step("chat", chat)
    _step("stream", stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_url", help="the stack's BaseUrl output, ending in /v1")
    parser.add_argument("token", help="a Globus access token with the gateway's scope")
    parser.add_argument("--model", help="the model to chat with (default: the first chat model)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    args = parser.parse_args(argv)
    try:
        run(args.base_url, args.token, args.model, args.timeout)
    except SmokeFailure as failure:
        print(f"FAIL {failure}", file=sys.stderr, flush=True)
        return 1
    print("smoke test passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
