"""The batch compute function against the mock vLLM (or a fake `vllm` CLI) and a recording
gateway that answers its callbacks and takes its uploads, over sockets."""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from compute_funcs import FUNCTIONS
from compute_funcs.batch import vllm_batch
from compute_funcs.register import code_serializer
from first_local.mock_vllm import MockConfig, count_prompt_tokens, create_app
from tests.conftest import PROJECT_ROOT
from tests.support.asgi import serve

MODEL = "meta-llama/Llama-3.2-1B-Instruct"  # not the mock's default, so a defaulted model shows
TOKEN = "batch-callback-token"
FAKE_VLLM = PROJECT_ROOT / "tests" / "fixtures" / "fake_vllm"
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


class Recorder:
    """ASGI wrapper around the mock vLLM that keeps every POST body it was sent."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        parts, more = [], True
        while more:
            message = await receive()
            parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(parts)
        self.bodies.append(json.loads(body))
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def numbers(self) -> list[int]:
        """The `#N` tags of the requests it saw (every test prompt carries its line's tag)."""
        return sorted(int(n) for b in self.bodies for n in re.findall(r"#(\d+)", json.dumps(b)))


@dataclass
class Gateway:
    """Plays the gateway: records callbacks, answers them, serves input, takes uploads."""

    url: str = ""
    stop_at_chunks: int | None = None  # answer progress `continue: false` from here on
    upload_reply: dict[str, Any] | None = None  # None: two PUT urls on this server
    done_statuses: list[int] = field(default_factory=list)  # answers to the first done posts
    events: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    puts: dict[str, bytes] = field(default_factory=dict)
    put_types: dict[str, str | None] = field(default_factory=dict)
    inputs: dict[str, bytes] = field(default_factory=dict)
    # The owner's token budget, as first_core.batches.budget answers `tokens` events: a minute's
    # limit, what is left of it, and how many asks are refused first (to be waited out).
    token_limit: int = 10**9
    tokens_left: int = 10**9
    refuse_asks: int = 0

    def tokens(self, event: dict[str, Any]) -> dict[str, Any]:
        if event["used"] is not None:
            self.tokens_left += self.granted[-1] - event["used"]
        want = event["want"]
        if want <= 0:
            return {"continue": True, "granted": 0}
        if want > self.token_limit:
            return {"continue": True, "granted": 0, "limit": self.token_limit}
        if self.refuse_asks or want > self.tokens_left:
            self.refuse_asks = max(0, self.refuse_asks - 1)
            return {"continue": True, "granted": 0, "limit": self.token_limit, "retry_in": 0.1}
        self.tokens_left -= want
        self.granted.append(want)
        return {"continue": True, "granted": want, "limit": self.token_limit}

    granted: list[int] = field(default_factory=list)

    async def callback(self, request: Request) -> Response:
        event = json.loads(await request.body())
        self.events.append(event)
        self.auth.append(request.headers.get("authorization"))
        if event["event"] == "tokens":
            return JSONResponse(self.tokens(event))
        if event["event"] == "progress":
            stop = self.stop_at_chunks is not None and event["chunks_done"] >= self.stop_at_chunks
            return JSONResponse({"continue": not stop})
        if event["event"] == "upload":
            reply = self.upload_reply or {
                "output_url": f"{self.url}/put/output?X-Amz-Signature=abc",
                "error_url": f"{self.url}/put/errors?X-Amz-Signature=def",
            }
            return JSONResponse(reply)
        status = self.done_statuses.pop(0) if self.done_statuses else 200
        return JSONResponse({"ok": status < 400}, status_code=status)

    async def put(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.puts[name] = await request.body()
        self.put_types[name] = request.headers.get("content-type")
        return Response(status_code=200)

    async def get_input(self, request: Request) -> Response:
        data = self.inputs.get(request.path_params["name"])
        return Response(status_code=404) if data is None else Response(data)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]


@pytest.fixture(scope="module")
def mock_vllm() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder(create_app(MockConfig()))
    with serve(recorder) as url:
        yield url, recorder


@pytest.fixture(scope="module")
def gateway_server() -> Iterator[tuple[str, list[Gateway]]]:
    current: list[Gateway] = []

    async def callback(request: Request) -> Response:
        return await current[-1].callback(request)

    async def put(request: Request) -> Response:
        return await current[-1].put(request)

    async def get_input(request: Request) -> Response:
        return await current[-1].get_input(request)

    routes = [
        Route("/cb", callback, methods=["POST"]),
        Route("/put/{name}", put, methods=["PUT"]),
        Route("/input/{name}", get_input, methods=["GET"]),
    ]
    with serve(Starlette(routes=routes)) as url:
        yield url, current


@pytest.fixture
def gateway(gateway_server: tuple[str, list[Gateway]]) -> Gateway:
    url, current = gateway_server
    current.append(Gateway(url=url))
    return current[-1]


@pytest.fixture
def recorder(mock_vllm: tuple[str, Recorder]) -> Recorder:
    mock_vllm[1].bodies.clear()
    return mock_vllm[1]


@pytest.fixture(autouse=True)
def _env(mock_vllm: tuple[str, Recorder], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRST_BATCH_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("FIRST_BATCH_RUNNER", "http")
    monkeypatch.setenv("VLLM_BASE_URL", f"{mock_vllm[0]}/v1")
    for name in ("FIRST_BATCH_ROOTS", "FIRST_BATCH_RUNNER_ARGS", "VLLM_API_KEY", "FAKE_VLLM_LOG"):
        monkeypatch.delenv(name, raising=False)


def chat_line(n: int, text: str = "Tell me about clusters", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": f"req-{n}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": f"{text} #{n}"}], **body},
    }


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((x if isinstance(x, str) else json.dumps(x)).encode() + b"\n" for x in lines)


def parse(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def run(
    gateway: Gateway, data: bytes | None = None, batch_id: str = "batch_test", **kwargs: Any
) -> dict[str, Any]:
    """Run a batch whose input the gateway serves (unless `input` is given), uploading results."""
    if data is not None:
        gateway.inputs[batch_id] = data
    arguments: dict[str, Any] = {
        "batch_id": batch_id,
        "model": MODEL,
        "input": {"url": f"{gateway.url}/input/{batch_id}"},
        "output": {"upload": True},
        "callback_url": f"{gateway.url}/cb",
        "callback_token": TOKEN,
        **kwargs,
    }
    return vllm_batch(**arguments)


def work_dir(tmp_path: Path, batch_id: str = "batch_test") -> Path:
    return tmp_path / "work" / batch_id


def test_250_lines_in_five_chunks(gateway: Gateway, recorder: Recorder, tmp_path: Path) -> None:
    lines: list[dict[str, Any]] = []
    expected = dict.fromkeys(USAGE_KEYS, 0)
    for n in range(250):
        if n % 10 == 3:  # completions
            prompt = f"Once upon a time #{n} [mock:tokens={n % 7 + 1}]"
            body: dict[str, Any] = {"prompt": prompt, "max_tokens": 50}
            lines.append(
                {"custom_id": f"req-{n}", "method": "POST", "url": "/v1/completions", "body": body}
            )  # no model: the batch's is filled in
            prompt_tokens, completion_tokens = count_prompt_tokens(prompt), n % 7 + 1
        elif n % 10 == 7:  # embeddings
            text = f"embed this #{n}"
            lines.append(
                {
                    "custom_id": f"req-{n}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": MODEL, "input": text, "dimensions": 8},
                }
            )
            prompt_tokens, completion_tokens = count_prompt_tokens(text), 0
        else:
            line = chat_line(n, f"Question [mock:tokens={n % 5 + 2}]")
            lines.append(line)
            content = line["body"]["messages"][0]["content"]
            prompt_tokens, completion_tokens = count_prompt_tokens(content), n % 5 + 2
        expected["prompt_tokens"] += prompt_tokens
        expected["completion_tokens"] += completion_tokens
        expected["total_tokens"] += prompt_tokens + completion_tokens

    report = run(gateway, jsonl(lines), chunk_lines=50)

    assert report["outcome"] == "completed" and report["error"] is None
    assert (report["completed"], report["failed"], report["total"]) == (250, 0, 250)
    assert report["resumed_lines"] == 0
    assert report["usage"] == expected
    assert recorder.numbers() == list(range(250))  # each line sent once

    output, errors = parse(gateway.puts["output"]), parse(gateway.puts["errors"])
    assert errors == [] and gateway.puts["errors"] == b""
    assert [line["custom_id"] for line in output] == [f"req-{n}" for n in range(250)]
    assert report["output"] == {"lines": 250, "bytes": len(gateway.puts["output"]), "path": None}
    assert report["errors"] == {"lines": 0, "bytes": 0, "path": None}
    assert gateway.put_types["output"] == "application/octet-stream"
    for n, line in enumerate(output):
        assert re.fullmatch(r"batch_req_[0-9a-f]{32}", line["id"])
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        assert isinstance(line["response"]["request_id"], str)
        body = line["response"]["body"]
        assert body["model"] == MODEL  # also where the line named no model
        kind = {3: "text_completion", 7: "list"}.get(n % 10, "chat.completion")
        assert body["object"] == kind
    assert (
        sum(line["response"]["body"]["usage"]["total_tokens"] for line in output)
        == (expected["total_tokens"])
    )

    assert [e["event"] for e in gateway.events] == ["progress"] * 6 + ["upload", "done"]
    assert set(gateway.auth) == {f"Bearer {TOKEN}"}
    progress = gateway.of("progress")
    assert [p["chunks_done"] for p in progress] == [0, 1, 2, 3, 4, 5]
    assert [p["completed"] for p in progress] == [0, 50, 100, 150, 200, 250]
    assert all(p["chunks_total"] == 5 and p["total"] == 250 and p["failed"] == 0 for p in progress)
    assert all(p["batch_id"] == "batch_test" and p["attempt"] == 1 for p in progress)
    assert gateway.of("done") == [report]
    # Completed and acknowledged: the results are with the gateway, the work dir goes.
    assert not work_dir(tmp_path).exists()


def test_failed_lines_go_to_the_error_file(
    gateway: Gateway, recorder: Recorder, tmp_path: Path
) -> None:
    lines: list[Any] = [
        chat_line(0),  # line 1
        chat_line(1, "Fail now [mock:error]"),  # line 2: vLLM answers 500
        "",  # line 3: blank, ignored but counted in line numbers
        '{"custom_id": "req-2", "body": ',  # line 4: bad JSON
        chat_line(3) | {"body": {**chat_line(3)["body"], "model": "other/model"}},  # line 5
        chat_line(4) | {"url": "/v1/images/generations"},  # line 6
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},  # line 7: no custom_id
        chat_line(6, max_tokens=10_000_000),  # line 8: vLLM answers 400
        chat_line(7),  # line 9
    ]
    gateway.done_statuses = [503] * 4  # the done callback is lost: the work dir stays
    report = run(gateway, jsonl(lines), chunk_lines=4)

    assert report["outcome"] == "completed"  # failed lines do not fail the batch
    assert (report["completed"], report["failed"], report["total"]) == (2, 6, 8)
    assert len(gateway.of("done")) == 4  # retried on 5xx
    assert recorder.numbers() == [0, 1, 6, 7]  # the unrunnable lines never reached vLLM

    output, errors = parse(gateway.puts["output"]), parse(gateway.puts["errors"])
    assert [line["custom_id"] for line in output] == ["req-0", "req-7"]
    by_id = {line["custom_id"]: line for line in errors if line["custom_id"]}
    assert [line["custom_id"] for line in errors] == [
        "req-1",
        None,
        "req-3",
        "req-4",
        None,
        "req-6",
    ]

    injected = by_id["req-1"]["response"]
    assert injected["status_code"] == 500 and by_id["req-1"]["error"] is None
    assert injected["body"]["error"]["message"] == "Mock engine failure (injected)."
    too_long = by_id["req-6"]["response"]
    assert too_long["status_code"] == 400
    assert "maximum context length" in too_long["body"]["error"]["message"]

    def problem(line: dict[str, Any]) -> tuple[str, str]:
        assert line["response"] is None
        return line["error"]["code"], line["error"]["message"]

    code, message = problem(errors[1])
    assert code == "invalid_json" and message.endswith("(line 4)")
    code, message = problem(by_id["req-3"])
    assert code == "model_mismatch" and "other/model" in message and message.endswith("(line 5)")
    code, message = problem(by_id["req-4"])
    assert code == "invalid_url" and "/v1/images/generations" in message
    assert message.endswith("(line 6)")
    code, message = problem(errors[4])
    assert code == "invalid_request" and message.endswith("(line 7)")

    # The work dir is kept (the done callback was not acknowledged) and holds what was uploaded.
    work = work_dir(tmp_path)
    assert (work / "output.jsonl").read_bytes() == gateway.puts["output"]
    assert (work / "errors.jsonl").read_bytes() == gateway.puts["errors"]
    assert sorted(p.name for p in work.glob("out-*.jsonl")) == [
        "out-000000.jsonl",
        "out-000001.jsonl",
    ]
    assert report["errors"]["bytes"] == len(gateway.puts["errors"])


def test_cancel_then_resume(
    gateway_server: tuple[str, list[Gateway]], recorder: Recorder, tmp_path: Path
) -> None:
    url, current = gateway_server
    data = jsonl([chat_line(n) for n in range(200)])

    first = Gateway(url=url, stop_at_chunks=2)
    current.append(first)
    report = run(first, data, chunk_lines=50)
    assert report["outcome"] == "cancelled" and report["error"] is None
    assert (report["completed"], report["failed"], report["total"]) == (100, 0, 200)
    assert recorder.numbers() == list(range(100))
    partial = parse(first.puts["output"])  # a cancelled batch still delivers what it has
    assert [line["custom_id"] for line in partial] == [f"req-{n}" for n in range(100)]
    assert [p["chunks_done"] for p in first.of("progress")] == [0, 1, 2]
    work = work_dir(tmp_path)
    owner = json.loads((work / "owner.json").read_text())
    assert owner["pid"] == os.getpid() and owner["attempt"] == 1
    assert owner["host"] == socket.gethostname()
    assert sorted(p.name for p in work.glob("out-*.jsonl")) == [
        "out-000000.jsonl",
        "out-000001.jsonl",
    ]

    recorder.bodies.clear()
    second = Gateway(url=url)
    current.append(second)
    report = run(second, chunk_lines=50, attempt=2)
    assert report["outcome"] == "completed" and report["attempt"] == 2
    assert report["resumed_lines"] == 100
    assert (report["completed"], report["failed"], report["total"]) == (200, 0, 200)
    assert recorder.numbers() == list(range(100, 200))  # only the lines not checkpointed
    progress = second.of("progress")
    assert progress[0]["chunks_done"] == 2 and progress[0]["completed"] == 100
    assert progress[0]["resumed_lines"] == 100 and progress[0]["attempt"] == 2
    output = parse(second.puts["output"])
    assert [line["custom_id"] for line in output] == [f"req-{n}" for n in range(200)]
    assert output[:100] == partial  # the resumed lines are the checkpointed ones, verbatim


def test_a_different_chunking_does_not_resume(
    gateway: Gateway, recorder: Recorder, tmp_path: Path
) -> None:
    gateway.stop_at_chunks = 1
    run(gateway, jsonl([chat_line(n) for n in range(30)]), chunk_lines=10)
    gateway.stop_at_chunks = None
    recorder.bodies.clear()
    report = run(gateway, chunk_lines=7, attempt=2)
    assert report["resumed_lines"] == 0 and report["completed"] == 30
    assert recorder.numbers() == list(range(30))


def test_cancelled_at_the_start_runs_nothing(gateway: Gateway, recorder: Recorder) -> None:
    gateway.stop_at_chunks = 0
    gateway.upload_reply = {"continue": False}  # the batch ended: nowhere to upload
    report = run(gateway, jsonl([chat_line(n) for n in range(10)]), chunk_lines=5)
    assert report["outcome"] == "cancelled" and report["error"] is None
    assert (report["completed"], report["total"]) == (0, 10)
    assert recorder.bodies == [] and gateway.puts == {}
    assert [e["event"] for e in gateway.events] == ["progress", "upload", "done"]


def test_unreachable_vllm_fails_the_batch_and_a_retry_resumes(
    gateway: Gateway, recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vllm_url = os.environ["VLLM_BASE_URL"]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    monkeypatch.setenv("VLLM_BASE_URL", f"http://127.0.0.1:{port}/v1")
    report = run(gateway, jsonl([chat_line(n) for n in range(6)]), chunk_lines=3)
    assert report["outcome"] == "failed"
    assert report["error"]["code"] == "backend_unreachable"
    assert "Traceback" not in report["error"]["message"]
    # Users read words: the address and the exception are in the endpoint's log only.
    assert str(port) not in report["error"]["message"]
    assert "Error" not in report["error"]["message"]
    assert not list(work_dir(tmp_path).glob("out-*.jsonl"))  # nothing checkpointed

    monkeypatch.setenv("VLLM_BASE_URL", vllm_url)
    report = run(gateway, attempt=2, chunk_lines=3)
    assert report["outcome"] == "completed" and report["completed"] == 6


def test_an_unknown_runner_is_refused(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIRST_BATCH_RUNNER", "gpu")
    report = run(gateway, jsonl([chat_line(0)]))
    assert report["outcome"] == "failed" and report["error"]["code"] == "invalid_runner"
    assert [e["event"] for e in gateway.events] == ["done"]


def test_input_that_cannot_be_downloaded(gateway: Gateway, tmp_path: Path) -> None:
    report = run(gateway, None, batch_id="batch_missing")  # the gateway answers 404
    assert report["outcome"] == "failed"
    assert report["error"]["code"] == "input_unreadable" and "404" in report["error"]["message"]
    assert report["total"] == 0 and gateway.of("progress") == [] and gateway.of("upload") == []
    assert gateway.of("done") == [report]


def test_path_input_and_folder_output(
    gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "in").mkdir(parents=True)
    other.mkdir()
    data = jsonl([chat_line(n) for n in range(5)] + [chat_line(5, "[mock:error]")])
    (root / "in" / "batch.jsonl").write_bytes(data)
    (other / "batch.jsonl").write_bytes(data)
    (root / "in" / "escape.jsonl").symlink_to(other / "batch.jsonl")
    roots = os.pathsep.join([str(tmp_path / "elsewhere"), str(root)])

    def attempt(path: str, folder: str | None = None, batch_id: str = "b1") -> dict[str, Any]:
        output = {"folder": folder} if folder else {"upload": True}
        return run(gateway, batch_id=batch_id, input={"path": path}, output=output)

    # No roots: this endpoint takes no paths at all.
    report = attempt(str(root / "in" / "batch.jsonl"))
    assert report["outcome"] == "failed" and report["error"]["code"] == "path_not_allowed"
    assert "FIRST_BATCH_ROOTS" in report["error"]["message"]
    monkeypatch.setenv("FIRST_BATCH_ROOTS", "")
    assert attempt(str(root / "in" / "batch.jsonl"))["error"]["code"] == "path_not_allowed"

    monkeypatch.setenv("FIRST_BATCH_ROOTS", roots)
    refused = [
        str(other / "batch.jsonl"),  # outside
        str(root / "in" / "escape.jsonl"),  # a symlink out of the root
        str(root / "in" / ".." / ".." / "other" / "batch.jsonl"),  # `..` out of the root
        "../other/batch.jsonl",  # relative (to the first root), and out of it
    ]
    for path in refused:
        report = attempt(path)
        assert report["outcome"] == "failed", path
        assert report["error"]["code"] == "path_not_allowed", path
        assert "Traceback" not in report["error"]["message"]
    report = attempt(str(root / "in" / "nothing-here.jsonl"))
    assert report["error"]["code"] == "input_unreadable"
    assert "nothing-here.jsonl" in report["error"]["message"]
    report = attempt(str(root / "in" / "batch.jsonl"), folder=str(other / "out"))
    assert report["error"]["code"] == "path_not_allowed" and not (other / "out").exists()
    assert gateway.puts == {} and gateway.of("progress") == []

    # Allowed: a `..` that stays inside the root is fine, and the folder is created.
    report = attempt(
        str(root / "in" / ".." / "in" / "batch.jsonl"), folder=str(root / "out"), batch_id="b2"
    )
    assert report["outcome"] == "completed", report["error"]
    assert (report["completed"], report["failed"]) == (5, 1)
    out, err = root / "out" / "b2_output.jsonl", root / "out" / "b2_errors.jsonl"
    assert report["output"] == {"lines": 5, "bytes": out.stat().st_size, "path": str(out)}
    assert report["errors"] == {"lines": 1, "bytes": err.stat().st_size, "path": str(err)}
    assert [line["custom_id"] for line in parse(out.read_bytes())] == [f"req-{n}" for n in range(5)]
    assert parse(err.read_bytes())[0]["custom_id"] == "req-5"
    assert gateway.of("upload") == [] and gateway.puts == {}

    # A relative path (FIRST's fixtures use them) is taken under the first root.
    monkeypatch.setenv("FIRST_BATCH_ROOTS", str(root))
    report = attempt("in/batch.jsonl", folder="out-relative", batch_id="b3")
    assert report["outcome"] == "completed", report["error"]
    assert report["output"]["path"] == str(root / "out-relative" / "b3_output.jsonl")


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("FIRST_BATCH_RUNNER", "vllm")
    monkeypatch.setenv("PYTHONPATH", str(FAKE_VLLM))
    log = tmp_path / "fake-vllm.log"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.setenv("VLLM_BASE_URL", "http://127.0.0.1:9/v1")  # must not be used
    return log


def test_vllm_run_batch_runner(
    gateway: Gateway, fake_vllm: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FIRST_BATCH_RUNNER_ARGS", "--tensor-parallel-size 1 --dtype 'auto'")
    lines: list[dict[str, Any]] = [chat_line(n, f"alpha beta gamma {n}") for n in range(12)]
    lines[4] = chat_line(4, "please [fake:error]")
    lines[9] = {
        "custom_id": "req-9",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"prompt": "hi"},
    }
    lines[10] = {
        "custom_id": "req-10",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"input": "one two three"},
    }
    report = run(gateway, jsonl(lines), chunk_lines=5)

    assert report["outcome"] == "completed", report["error"]
    assert (report["completed"], report["failed"], report["total"]) == (10, 2, 12)
    runs = [json.loads(line) for line in fake_vllm.read_text().splitlines()]
    assert len(runs) == 3  # one run_batch per chunk
    for ran in runs:
        argv = ran["argv"]
        assert argv[argv.index("--model") + 1] == MODEL
        assert argv[-4:] == ["--tensor-parallel-size", "1", "--dtype", "auto"]
    assert "req-9" not in [i for ran in runs for i in ran["custom_ids"]]

    output = {line["custom_id"]: line for line in parse(gateway.puts["output"])}
    errors = {line["custom_id"]: line for line in parse(gateway.puts["errors"])}
    assert sorted(errors) == ["req-4", "req-9"]
    answer = output["req-2"]
    assert re.fullmatch(r"batch_req_[0-9a-f]{32}", answer["id"])
    assert answer["response"]["request_id"].startswith("vllm-batch-")
    assert answer["response"]["body"]["choices"][0]["message"]["content"] == (
        "#2 2 gamma beta alpha"
    )
    assert output["req-10"]["response"]["body"]["object"] == "list"
    failed = errors["req-4"]
    assert failed["error"] is None and failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"]["message"] == "Injected failure of the fake engine"
    assert errors["req-9"]["response"] is None
    assert errors["req-9"]["error"]["code"] == "unsupported_url"
    chat_tokens = sum(5 * 2 for n in range(12) if n not in (4, 9, 10))  # 5 words in, 5 out
    assert report["usage"] == {
        "prompt_tokens": chat_tokens // 2 + 3,
        "completion_tokens": chat_tokens // 2,
        "total_tokens": chat_tokens + 3,
    }
    assert not work_dir(tmp_path).exists()


def test_a_crashing_runner_fails_the_batch(
    gateway: Gateway, fake_vllm: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FIRST_BATCH_RUNNER_ARGS", "--fake-exit 3")
    report = run(gateway, jsonl([chat_line(n) for n in range(4)]), chunk_lines=2)
    assert report["outcome"] == "failed"
    error = report["error"]
    assert error["code"] == "runner_failed"
    assert "exited with status 3 on chunk 0" in error["message"]
    assert error["message"].endswith("RuntimeError: CUDA out of memory (fake)")
    assert 2000 < len(error["message"]) <= 2100  # the tail of a long log, not all of it
    assert (report["completed"], report["failed"], report["total"]) == (0, 0, 4)
    assert gateway.of("done") == [report]
    assert (work_dir(tmp_path) / "runner-000000.err").exists()  # kept for the operator


def test_it_ships_as_source(gateway: Gateway, recorder: Recorder) -> None:
    assert FUNCTIONS["batch"] is vllm_batch
    serializer = code_serializer()
    shipped = serializer.deserialize(serializer.serialize(vllm_batch))
    assert shipped is not vllm_batch
    gateway.inputs["batch_shipped"] = jsonl([chat_line(n) for n in range(5)])
    report = shipped(
        batch_id="batch_shipped",
        model=MODEL,
        input={"url": f"{gateway.url}/input/batch_shipped"},
        output={"upload": True},
        callback_url=f"{gateway.url}/cb",
        callback_token=TOKEN,
        chunk_lines=2,
    )
    assert report["outcome"] == "completed" and report["completed"] == 5
    assert recorder.numbers() == [0, 1, 2, 3, 4]


def test_user_roots_keep_each_owner_to_their_own_directory(
    gateway: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`{user}` in FIRST_BATCH_ROOTS is the batch's owner: no one reads another's files."""
    shared = tmp_path / "fs"
    for user in ("alice@anl.gov", "dave@anl.gov"):
        (shared / user).mkdir(parents=True)
        (shared / user / "in.jsonl").write_bytes(jsonl([chat_line(0)]))
    monkeypatch.setenv("FIRST_BATCH_ROOTS", str(shared / "{user}"))

    def attempt(owner: str, path: str, batch_id: str) -> dict[str, Any]:
        return run(
            gateway,
            batch_id=batch_id,
            input={"path": path},
            output={"folder": "out"},
            owner=owner,
        )

    mine = attempt("alice@anl.gov", "in.jsonl", "u1")  # relative: her own directory
    assert mine["outcome"] == "completed", mine["error"]
    assert mine["output"]["path"] == str(shared / "alice@anl.gov" / "out" / "u1_output.jsonl")
    for number, (owner, path) in enumerate(
        (
            ("dave@anl.gov", str(shared / "alice@anl.gov" / "in.jsonl")),  # someone else's file
            ("dave@anl.gov", "../alice@anl.gov/in.jsonl"),
            ("", "in.jsonl"),  # per-user roots and no owner: nothing is allowed
        )
    ):
        report = attempt(owner, path, f"u-refused-{number}")
        assert report["outcome"] == "failed", (owner, path)
        assert report["error"]["code"] == "path_not_allowed", (owner, path, report["error"])
    # An owner name cannot climb out either: its slashes are not path separators.
    report = attempt("../alice@anl.gov", "in.jsonl", "u-climb")
    assert report["outcome"] == "failed" and report["completed"] == 0
    assert not (shared / "alice@anl.gov" / "out" / "u-climb_output.jsonl").exists()


# -- the owner's token budget (first_core.batches.budget answers on the gateway) -----------------


def test_lines_without_max_tokens_are_sent_the_cap(gateway: Gateway, recorder: Recorder) -> None:
    lines = [chat_line(0), chat_line(1, max_tokens=7), chat_line(2, max_completion_tokens=9)]
    completion = {
        "custom_id": "c-3",
        "url": "/v1/completions",
        "body": {"model": MODEL, "prompt": "Once #3"},
    }
    embedding = {"custom_id": "e-4", "url": "/v1/embeddings", "body": {"input": "x #4"}}

    report = run(gateway, jsonl([*lines, completion, embedding]), max_tokens=300)

    assert report["outcome"] == "completed"
    sent = {b.get("prompt") or json.dumps(b.get("messages") or b.get("input")): b
            for b in recorder.bodies}
    by_line = {int(re.findall(r"#(\d+)", key)[0]): body for key, body in sent.items()}
    assert by_line[0]["max_tokens"] == 300
    assert by_line[1]["max_tokens"] == 7
    assert "max_tokens" not in by_line[2] and by_line[2]["max_completion_tokens"] == 9
    assert by_line[3]["max_tokens"] == 16  # vLLM's own default for text completions, kept
    assert "max_tokens" not in by_line[4]


def test_lines_wait_for_the_budget_and_settle_what_they_used(
    gateway: Gateway, recorder: Recorder
) -> None:
    gateway.refuse_asks = 2  # the minute is used up: the first two asks are to be waited out
    report = run(gateway, jsonl([chat_line(n) for n in range(6)]), max_tokens=50,
                 token_budget=True, chunk_lines=3)

    assert report["outcome"] == "completed" and report["completed"] == 6
    asks = gateway.of("tokens")
    # Refused twice, then one grant per chunk, then the last grant settled.
    assert [a["want"] > 0 for a in asks] == [True] * 4 + [False]
    assert asks[0]["want"] == asks[1]["want"] == asks[2]["want"]
    assert [a["used"] for a in asks[:3]] == [None, None, None]
    used = [a["used"] for a in asks[3:]]
    assert all(isinstance(u, int) and u > 0 for u in used)
    assert sum(used) == report["usage"]["total_tokens"]
    assert gateway.tokens_left == 10**9 - sum(used)  # what was granted and not used came back
    assert all(b["max_tokens"] == 50 for b in recorder.bodies)


def test_lines_are_grouped_to_fit_a_minute_and_a_line_that_never_fits_fails(
    gateway: Gateway, recorder: Recorder
) -> None:
    gateway.token_limit = 400  # each line may use ~55 (its prompt's estimate) plus 100
    lines = [chat_line(n, max_tokens=100) for n in range(4)]
    lines.insert(2, chat_line(9, max_tokens=1000))
    report = run(gateway, jsonl(lines), token_budget=True)

    assert (report["completed"], report["failed"]) == (4, 1)
    # Two lines to a grant (the first ask, for all five lines, learnt the limit).
    assert len(gateway.granted) == 2 and all(250 < w <= 400 for w in gateway.granted)
    [refused] = parse(gateway.puts["errors"])
    assert refused["custom_id"] == "req-9"
    assert refused["error"]["code"] == "request_too_large"
    assert sorted(recorder.numbers()) == [0, 1, 2, 3]  # the line too large was never sent


def test_a_stop_while_waiting_for_tokens_ends_the_run_cancelled(gateway: Gateway) -> None:
    gateway.refuse_asks = 10**6
    asked: list[int] = []

    def stop_after_two(event: dict[str, Any]) -> dict[str, Any]:
        asked.append(event["want"])
        return {"continue": len(asked) < 2, "granted": 0, "retry_in": 0.1}

    gateway.tokens = stop_after_two  # type: ignore[method-assign]
    report = run(gateway, jsonl([chat_line(0)]), token_budget=True)

    assert report["outcome"] == "cancelled" and len(asked) == 2
