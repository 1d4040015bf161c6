"""The streaming compute function against the mock vLLM and a recording callback, over sockets."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from compute_funcs.streaming import vllm_streaming
from first_core.inference import assemble
from first_local.mock_vllm import MockConfig, count_prompt_tokens, create_app
from tests.support.asgi import serve

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
TOKEN = "callback-token-for-test"


@dataclass
class Receiver:
    """Records every batch posted to it; can stop the stream or fail a delivery once."""

    url: str = ""
    stop_after: int | None = None  # answer `continue: false` from this many batches on
    fail_once: set[int] = field(default_factory=set)  # seqs whose first delivery gets a 503
    posts: list[tuple[float, dict[str, Any], str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle(self, request: Request) -> Response:
        batch = json.loads(await request.body())
        with self.lock:
            self.posts.append((time.monotonic(), batch, request.headers.get("authorization")))
            if batch["seq"] in self.fail_once:
                self.fail_once.discard(batch["seq"])
                return JSONResponse({"error": "try again"}, status_code=503)
            accepted = len(self.batches())
        stopped = self.stop_after is not None and accepted >= self.stop_after
        return JSONResponse({"continue": not stopped, "duplicate": False})

    def batches(self) -> list[dict[str, Any]]:
        """One per seq (the first delivery), in arrival order."""
        seen: dict[int, dict[str, Any]] = {}
        for _, batch, _ in self.posts:
            seen.setdefault(batch["seq"], batch)
        return list(seen.values())


@pytest.fixture(scope="module")
def vllm_url() -> Iterator[str]:
    with serve(create_app(MockConfig(tokens_per_second=50))) as url:
        yield url


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[tuple[str, list[Receiver]]]:
    current: list[Receiver] = []

    async def route(request: Request) -> Response:
        return await current[-1].handle(request)

    with serve(Starlette(routes=[Route("/cb", route, methods=["POST"])])) as url:
        yield url, current


@pytest.fixture
def receiver(receiver_server: tuple[str, list[Receiver]]) -> Receiver:
    url, current = receiver_server
    current.append(Receiver(url=f"{url}/cb"))
    return current[-1]


@pytest.fixture(autouse=True)
def _vllm_env(vllm_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_BASE_URL", f"{vllm_url}/v1")


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def run(receiver: Receiver, payload: dict[str, Any], path: str = "chat/completions",
        ) -> dict[str, Any]:
    return vllm_streaming(payload, path, "req_test", receiver.url, TOKEN)


def direct_stream(vllm_url: str, path: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The mock's own SSE payloads for the same request, minus per-request ids and times."""
    options = {"include_usage": True, "continuous_usage_stats": True}  # what the function asks
    body = {**payload, "stream": True, "stream_options": options}
    with httpx.stream("POST", f"{vllm_url}/v1/{path}", json=body, timeout=30) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [strip(json.loads(line)) for line in lines[:-1]]


def strip(chunk: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in chunk.items() if k not in ("id", "created")}


def test_batches_are_numbered_prompt_and_complete(receiver: Receiver, vllm_url: str) -> None:
    payload = chat("Tell me about clusters [mock:tokens=20]")
    start = time.monotonic()
    result = run(receiver, payload)
    finished = time.monotonic()
    batches = receiver.batches()
    assert [b["seq"] for b in batches] == list(range(len(batches)))
    assert len(receiver.posts) == len(batches)  # no retries were needed
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in receiver.posts)
    assert [b["done"] for b in batches] == [False] * (len(batches) - 1) + [True]
    assert all(len(b["chunks"]) <= 16 for b in batches)
    assert len(batches) > 2  # relayed as it was generated, not in one piece at the end

    # The first batch leaves ~20 ms after the first token, long before the 400 ms stream ends.
    first_at = receiver.posts[0][0] - start
    took = (finished - start) * 1000
    print(f"first batch after {first_at * 1000:.1f} ms; the stream took {took:.0f} ms")
    assert first_at < 0.15
    assert receiver.posts[0][0] < receiver.posts[-1][0] - 0.2

    relayed = [chunk for b in batches for chunk in b["chunks"]]
    assert relayed == result["chunks"]
    assert "[DONE]" not in relayed
    assert [strip(json.loads(c)) for c in relayed] == direct_stream(vllm_url, "chat/completions",
                                                                    payload)
    usage = batches[-1]["usage"]
    assert usage["completion_tokens"] == 20 and usage["prompt_tokens"] > 0
    assert batches[-1]["error"] is None
    assert result["usage"] == usage and result["status_code"] == 200
    assert result["cancelled"] is False

    plain = httpx.post(f"{vllm_url}/v1/chat/completions", json=payload, timeout=30).json()
    body = result["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert body["usage"] == plain["usage"]
    # The gateway assembles the same answer from the stored chunks (GET /v1/requests/{id}).
    assert assemble.assemble("chat/completions", relayed) == body


def test_text_completion_is_assembled(receiver: Receiver, vllm_url: str) -> None:
    payload = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 7}
    result = run(receiver, payload, "completions")
    plain = httpx.post(f"{vllm_url}/v1/completions", json=payload, timeout=30).json()
    assert result["body"]["object"] == "text_completion"
    assert result["body"]["choices"][0]["text"] == plain["choices"][0]["text"]
    assert result["body"]["choices"][0]["finish_reason"] == "length"
    assert receiver.batches()[-1]["usage"]["completion_tokens"] == 7
    assert assemble.assemble("completions", result["chunks"]) == result["body"]


def test_mid_stream_error_ends_with_the_error(receiver: Receiver) -> None:
    result = run(receiver, chat("Fail soon [mock:error-after=3] [mock:tokens=20]"))
    batches = receiver.batches()
    final = batches[-1]
    assert final["done"] is True
    assert final["error"]["message"] == "Mock engine failure mid-stream (injected)."
    assert final["error"]["type"] == "InternalServerError"
    relayed = [json.loads(c) for b in batches for c in b["chunks"]]
    assert all("error" not in c for c in relayed)
    assert len(relayed) == 4  # the role chunk and three tokens
    # vLLM's running usage of the last chunk: the prompt and the three tokens.
    assert final["usage"]["completion_tokens"] == 3 and final["usage"]["prompt_tokens"] > 0
    assert result["status_code"] == 500 and result["body"] == {"error": final["error"]}


def test_http_error_before_streaming(receiver: Receiver) -> None:
    result = run(receiver, chat("Fail now [mock:error]"))
    assert receiver.batches() == [{
        "request_id": "req_test", "seq": 0, "chunks": [], "done": True, "usage": None,
        "error": {"message": "Mock engine failure (injected).", "type": "InternalServerError",
                  "param": None, "code": 500},
    }]
    assert result["status_code"] == 500 and result["chunks"] == []


def test_bad_request_keeps_vllms_status(receiver: Receiver) -> None:
    result = run(receiver, chat("hi", max_tokens=10_000_000))
    assert result["status_code"] == 400
    assert "maximum context length" in receiver.batches()[0]["error"]["message"]


def test_a_fitted_max_tokens_too_large_for_the_context_is_lowered_once(
    receiver: Receiver,
) -> None:
    """The gateway filled in max_tokens (the caller named none): the model's 8,192-token context
    has less room, so vLLM refuses it and it is sent again with the room left."""
    payload = chat("hi [mock:tokens=5]", max_tokens=8192)
    result = vllm_streaming(
        payload, "chat/completions", "req_test", receiver.url, TOKEN, fitted_max_tokens=True
    )
    assert result["status_code"] == 200 and result["body"]["choices"][0]["message"]["content"]
    assert receiver.batches()[-1]["usage"]["completion_tokens"] == 5
    # A max_tokens the caller named is the caller's: vLLM's refusal reaches them as it is.
    assert run(receiver, payload)["status_code"] == 400


def test_continue_false_stops_reading_and_reports_usage(receiver: Receiver) -> None:
    receiver.stop_after = 2
    start = time.monotonic()
    result = run(receiver, chat("A long answer [mock:tokens=200]"))  # 4 s at 50 tokens/s
    elapsed = time.monotonic() - start
    assert result["cancelled"] is True
    assert elapsed < 1.0
    assert 0 < len(result["chunks"]) < 50
    batches = receiver.batches()
    assert [b["seq"] for b in batches] == [0, 1, 2]
    assert [b["done"] for b in batches] == [False, False, True]
    assert batches[2]["chunks"] == []
    generated = result["usage"]["completion_tokens"]
    # The running usage vLLM sent with the last chunk read: the prompt counts too.
    prompt = result["usage"]["prompt_tokens"]
    assert prompt == count_prompt_tokens("A long answer [mock:tokens=200]") > 0
    assert batches[2]["usage"] == {"prompt_tokens": prompt, "completion_tokens": generated,
                                   "total_tokens": prompt + generated}
    assert 0 < generated < 200
    time.sleep(0.1)
    assert len(receiver.posts) == 3  # nothing after the final batch


def test_failed_delivery_is_retried_with_the_same_seq(receiver: Receiver) -> None:
    receiver.fail_once = {1}
    result = run(receiver, chat("Retry me [mock:tokens=20]"))
    seqs = [batch["seq"] for _, batch, _ in receiver.posts]
    assert seqs.count(1) == 2
    assert seqs == sorted(seqs)
    batches = receiver.batches()
    assert [b["seq"] for b in batches] == list(range(len(batches)))
    assert [c for b in batches for c in b["chunks"]] == result["chunks"]


def test_unreachable_vllm(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    monkeypatch.setenv("VLLM_BASE_URL", f"http://127.0.0.1:{port}/v1")
    result = run(receiver, chat("hello"))
    (final,) = receiver.batches()
    assert final["done"] is True and final["error"]["code"] == "backend_unreachable"
    assert result["status_code"] == 502
    # The client reads this message: vLLM's address and the exception stay on the endpoint.
    assert final["error"]["message"] == "The model server failed while streaming."


def test_unreachable_vllm_without_streaming_names_no_address(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from compute_funcs.inference import vllm_inference

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    monkeypatch.setenv("VLLM_BASE_URL", f"http://127.0.0.1:{port}/v1")
    # The callback goes nowhere either (best effort); the return value is what counts here.
    callback = f"http://127.0.0.1:{port}/cb"
    result = vllm_inference(chat("hello"), "chat/completions", "req_test", callback, TOKEN)
    error = result["body"]["error"]
    assert result["status_code"] == 502 and error["code"] == "backend_unreachable"
    assert error["message"] == "The model server could not be reached."
    assert f"127.0.0.1:{port}" in capsys.readouterr().err  # the endpoint's own log has it


def test_responses_stream_ends_at_its_completed_event(receiver: Receiver, vllm_url: str) -> None:
    payload = {"model": MODEL, "input": "Tell me about queues [mock:tokens=9]"}
    result = run(receiver, payload, "responses")
    batches = receiver.batches()
    assert result["status_code"] == 200 and batches[-1]["error"] is None  # EOF after the end
    kinds = [json.loads(c)["type"] for b in batches for c in b["chunks"]]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    plain = httpx.post(f"{vllm_url}/v1/responses", json=payload, timeout=30).json()
    assert batches[-1]["usage"]["output_tokens"] == 9
    assert batches[-1]["usage"]["input_tokens"] == plain["usage"]["input_tokens"]
    body = result["body"]
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"] == plain["output"][0]["content"][0]["text"]
    assert assemble.assemble("responses", result["chunks"]) == body


def test_messages_stream_is_rebuilt_as_a_message(receiver: Receiver, vllm_url: str) -> None:
    payload = {"model": MODEL, "max_tokens": 6, "messages": [{"role": "user", "content": "Hi"}]}
    result = run(receiver, payload, "messages")
    batches = receiver.batches()
    assert result["status_code"] == 200 and batches[-1]["error"] is None
    plain = httpx.post(f"{vllm_url}/v1/messages", json=payload, timeout=30).json()
    body = result["body"]
    assert body["content"] == plain["content"] and body["stop_reason"] == plain["stop_reason"]
    assert body["usage"] == plain["usage"]
    assert batches[-1]["usage"] == plain["usage"]
    assert assemble.assemble("messages", result["chunks"]) == body


def test_messages_stream_stopped_early_counts_input_and_output(receiver: Receiver) -> None:
    receiver.stop_after = 2
    text = "Tell me a long story [mock:tokens=200] [mock:rate=100]"
    payload = {"model": MODEL, "max_tokens": 300, "messages": [{"role": "user", "content": text}]}
    result = run(receiver, payload, "messages")
    assert result["cancelled"] is True
    usage = receiver.batches()[-1]["usage"]
    assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] < 200
