"""The batch function that runs ON a cluster's Globus Compute endpoint: one OpenAI batch, resumably.

Like `compute_funcs.inference` it is serialized and shipped as source, so it imports nothing from
the gateway and only the standard library, inside the function body.

Call (keyword arguments):
    vllm_batch(batch_id, model, input, output, callback_url, callback_token,
               chunk_lines=100, attempt=1, owner="", max_tokens=None, token_budget=False)
        -> report

* `max_tokens`: sent as the `max_tokens` of every chat or completion line that names neither it
  nor `max_completion_tokens` (text completions keep vLLM's default of 16 within it). Where vLLM
  refuses such a line as too large for the model's context, it runs once more with the room left.
* `token_budget`: lines take their tokens from the owner's per-minute budget (`tokens` below):
  they run in groups the gateway granted, waiting while the minute has too few.

* `input` is `{"url": <presigned GET url>}` or `{"path": <path on the cluster>}`; the
  file holds OpenAI batch lines, `{"custom_id", "method": "POST", "url", "body"}`, with `url` one
  of `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`.
* `owner` is the batch owner's Globus username; `{user}` in a `FIRST_BATCH_ROOTS` entry stands
  for it (characters other than letters, digits and `@._-` become `_`).
* `output` is `{"upload": True}` (ask the gateway for presigned PUT urls at the end) or
  `{"folder": <dir on the cluster>}` (write `<batch_id>_output.jsonl` and
  `<batch_id>_errors.jsonl` there). Paths, in and out, must lie under `FIRST_BATCH_ROOTS`
  (os.pathsep-separated); a relative path is taken under the first of them.

Work dir `$FIRST_BATCH_WORK_DIR/<batch_id>` (default `~/.first/batches/<batch_id>`):
    owner.json        {"pid", "host", "attempt", "started"} of the process running the batch
    input.jsonl       the input, fetched once; a later attempt reuses it
    plan.json         {"chunk_lines", "total", "bytes"}: checkpoints from another plan are dropped
    out-NNNNNN.jsonl  chunk N's output lines, written (temp file + os.replace) only once the whole
                      chunk is done; a later attempt skips chunks that have one (the resume)
    output.jsonl, errors.jsonl   the merged result, succeeded lines and the others
Blank input lines are ignored; line numbers in messages are 1-based over the file. Chunk N holds
the non-blank lines N*chunk_lines .. (N+1)*chunk_lines-1.

Output lines are OpenAI's batch output format, `{"id": "batch_req_<hex>", "custom_id",
"response": {"status_code", "request_id", "body"}, "error": null}`. A line that could not be run at
all (bad JSON, no custom_id or body, another url, another model than `model`, vLLM unreachable)
has `"response": null, "error": {"code", "message"}` with the line number in the message. A line
succeeded iff its response is not null and its status_code < 400.

Callbacks: POSTed as JSON to `callback_url` with `Authorization: Bearer <callback_token>`,
4 tries with back-off on a network error or a 5xx.
    progress  {"batch_id", "event": "progress", "attempt", "completed", "failed", "total",
               "chunks_done", "chunks_total", "resumed_lines"}: once at the start, then after each
               chunk's checkpoint. Reply `{"continue": bool}`: false (cancelled or expired) stops
               the run, which then finalizes as "cancelled"; so does a 4xx (the gateway refuses
               this attempt). A progress callback that cannot be delivered is not fatal.
    upload    {"batch_id", "event": "upload", "attempt"} (output {"upload": True} only). Reply
               `{"output_url", "error_url"}` (presigned PUT urls; optional "headers" to send with
               both PUTs) or `{"continue": false}` when the batch has ended meanwhile (no upload).
    tokens    {"batch_id", "event": "tokens", "attempt", "want", "used"} (token_budget only):
               before each group of lines, `want` = their prompts' estimates (bytes / 4) plus
               max_tokens * n; `used` = what the last granted group used (null at first). Reply
               `{"granted": want}` (run them), `{"granted": 0, "retry_in": s}` (wait, ask
               again), `{"granted": 0, "limit": L}` (ask for fewer lines: a line alone over L
               fails with "request_too_large"), or `{"continue": false}` (stop: cancelled).
               After the last group, `want` 0 settles it.
    done      the final report, also the return value (the reconciler reads that when the
               callback is lost): {"batch_id", "event": "done", "attempt", "outcome":
               "completed" | "cancelled" | "failed", "completed", "failed", "total",
               "resumed_lines", "usage": {"prompt_tokens", "completion_tokens", "total_tokens"},
               "output": {"lines", "bytes", "path"}, "errors": {"lines", "bytes", "path"},
               "error": null | {"code", "message"}}.
The work dir is removed only after a completed batch's done callback was acknowledged (2xx): then
the results are with the gateway. Otherwise it stays, so the gateway's next attempt (attempt + 1)
resumes from the checkpoints (a SIGKILL, a lost callback, a failed upload) and operators can look.

Runners (`FIRST_BATCH_RUNNER`):
    "vllm" (default)  per chunk, `python -m vllm.entrypoints.openai.run_batch -i in -o out
                      --model <model> $FIRST_BATCH_RUNNER_ARGS` (python: `FIRST_BATCH_PYTHON`,
                      default this interpreter). Its stdout/stderr go to `runner-NNNNNN.out/.err`;
                      a non-zero exit fails the batch with the stderr tail. vLLM's run_batch loads
                      the model for every chunk, so give this runner large chunks: the
                      endpoint's `FIRST_BATCH_RUNNER_CHUNK_LINES` overrides `chunk_lines`. It does
                      not serve /v1/completions: such lines fail with "unsupported_url".
    "http"            POST each line's body to the running `vllm serve` at `VLLM_BASE_URL`
                      (default http://127.0.0.1:8000/v1) with `VLLM_API_KEY`, timeout
                      `VLLM_TIMEOUT_SECONDS` (default 3600), `FIRST_BATCH_CONCURRENCY` (default 8)
                      at a time. A chunk none of whose lines reached vLLM fails the batch
                      ("backend_unreachable") instead of checkpointing, so a retry can resume.
"""

from __future__ import annotations

from typing import Any


def vllm_batch(
    batch_id: str,
    model: str,
    input: dict[str, Any],
    output: dict[str, Any],
    callback_url: str,
    callback_token: str,
    chunk_lines: int = 100,
    attempt: int = 1,
    owner: str = "",
    max_tokens: int | None = None,
    token_budget: bool = False,
) -> dict[str, Any]:
    """Run one batch attempt (resuming from its checkpoints), reporting progress to the batch
    callback, then deliver the outputs (upload or folder) and post the `done` report, which it
    also returns."""
    import concurrent.futures
    import contextlib
    import json
    import os
    import re
    import shlex
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.error
    import urllib.request
    import uuid

    endpoints = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
    # The endpoint's operator may override the gateway's chunk size: the "vllm" runner loads
    # the model once per chunk and wants thousands of lines, the "http" runner a hundred.
    chunk_lines = max(1, int(os.environ.get("FIRST_BATCH_RUNNER_CHUNK_LINES") or chunk_lines))
    runner = (os.environ.get("FIRST_BATCH_RUNNER") or "vllm").strip().lower()
    base_url = os.environ.get("VLLM_BASE_URL", "http://127.0.0.1:8000/v1").rstrip("/")
    api_key = os.environ.get("VLLM_API_KEY")
    timeout = float(os.environ.get("VLLM_TIMEOUT_SECONDS") or 3600)
    concurrency = max(1, int(os.environ.get("FIRST_BATCH_CONCURRENCY") or 8))
    work_root = os.path.expanduser(os.environ.get("FIRST_BATCH_WORK_DIR") or "~/.first/batches")
    work = os.path.join(work_root, batch_id)
    input_path = os.path.join(work, "input.jsonl")

    class BatchError(Exception):
        def __init__(self, code: str, message: str) -> None:
            super().__init__(message)
            self.code, self.message = code, message

    class Stopped(Exception):
        """The gateway said to stop (cancelled, expired, or this attempt was replaced)."""

    # -- files ------------------------------------------------------------------------------

    def write_atomic(path: str, write: Any) -> None:
        """`write(file)` into a temp file beside `path`, then rename it over `path`."""
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def write_json(path: str, value: Any) -> None:
        write_atomic(path, lambda file: file.write(json.dumps(value).encode()))

    def write_lines(path: str, lines: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
        write_atomic(path, lambda file: file.write(data.encode()))

    def read_lines(path: str) -> list[dict[str, Any]]:
        with open(path, encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]

    def allowed(path: Any, what: str) -> str:
        """The real path of `path` if it lies under one of `FIRST_BATCH_ROOTS`, where `{user}`
        stands for the batch's owner: a root like /eagle/first/{user} gives each user a
        directory no other user's batch can read or write."""
        user = re.sub(r"[^A-Za-z0-9@._-]", "_", owner)
        roots = [
            os.path.realpath(root.replace("{user}", user))
            for root in os.environ.get("FIRST_BATCH_ROOTS", "").split(os.pathsep)
            if root.strip() and ("{user}" not in root or user.strip(".") != "")
        ]
        if not roots:
            raise BatchError(
                "path_not_allowed",
                f"This endpoint accepts no {what} paths (FIRST_BATCH_ROOTS is not set, or "
                "names only per-user directories and the batch has no owner).",
            )
        if not isinstance(path, str) or not path:
            raise BatchError("path_not_allowed", f"The {what} path must be a string: {path!r}.")
        # A relative path names a place under the first root (the project's directory).
        real = os.path.realpath(os.path.join(roots[0], path))
        if not any(os.path.commonpath([real, root]) == root for root in roots):
            raise BatchError(
                "path_not_allowed",
                f"The {what} path {path} is outside the directories this endpoint allows.",
            )
        return real

    # -- callbacks --------------------------------------------------------------------------

    def post(body: dict[str, Any]) -> tuple[int | None, Any]:
        """POST to the gateway: (status, reply JSON), or (None, None) if it never got there."""
        data = json.dumps(body).encode()
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {callback_token}",
        }
        for attempt_no in range(4):
            request = urllib.request.Request(
                callback_url, data=data, headers=headers, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    status, raw = response.status, response.read()
            except urllib.error.HTTPError as failure:
                status, raw = failure.code, failure.read()
                failure.close()
            except (urllib.error.URLError, OSError, ValueError):
                status, raw = None, b""
            if status is not None and status < 500:
                try:
                    return status, json.loads(raw or b"null")
                except ValueError:
                    return status, None
            if attempt_no < 3:
                time.sleep(0.2 * 2**attempt_no)
        return None, None

    def put_file(url: str, path: str, extra: dict[str, str]) -> None:
        size = os.path.getsize(path)
        # A presigned PUT signs no Content-Type unless told to; urllib would otherwise send
        # x-www-form-urlencoded. Content-Length keeps urllib from sending the file chunked.
        headers = {"Content-Type": "application/octet-stream", **extra, "Content-Length": str(size)}
        problem = ""
        for attempt_no in range(4):
            with open(path, "rb") as file:
                request = urllib.request.Request(url, data=file, headers=headers, method="PUT")
                try:
                    with urllib.request.urlopen(request, timeout=600) as response:
                        response.read()
                    return
                except urllib.error.HTTPError as failure:
                    problem = f"HTTP {failure.code}: {failure.read()[:500]!r}"
                    failure.close()
                    if failure.code < 500:
                        break
                except (urllib.error.URLError, OSError) as failure:
                    problem = f"{type(failure).__name__}: {failure}"
            if attempt_no < 3:
                time.sleep(0.5 * 2**attempt_no)
        raise BatchError("upload_failed", f"Uploading {os.path.basename(path)} failed: {problem}")

    # -- input ------------------------------------------------------------------------------

    def fetch_input() -> None:
        if os.path.exists(input_path):  # a resumed attempt
            return
        if not isinstance(input, dict) or not (input.get("url") or input.get("path")):
            raise BatchError("input_unreadable", "The input names neither a url nor a path.")
        if input.get("path"):
            source = allowed(input["path"], "input")
            try:
                with open(source, "rb") as file:
                    write_atomic(input_path, lambda out: shutil.copyfileobj(file, out, 1 << 20))
            except OSError as error:
                raise BatchError(
                    "input_unreadable",
                    f"The input file {input['path']} could not be read: {error.strerror or error}.",
                ) from None
            return
        problem = ""
        for attempt_no in range(3):
            try:
                with urllib.request.urlopen(str(input["url"]), timeout=300) as response:
                    write_atomic(input_path, lambda out: shutil.copyfileobj(response, out, 1 << 20))
                return
            except urllib.error.HTTPError as failure:
                problem = f"HTTP {failure.code}"
                failure.close()
                if failure.code < 500:
                    break
            except (urllib.error.URLError, OSError, ValueError) as failure:
                problem = f"{type(failure).__name__}: {failure}"
            if attempt_no < 2:
                time.sleep(0.5 * 2**attempt_no)
        raise BatchError("input_unreadable", f"The input file could not be downloaded ({problem}).")

    def index_input() -> list[tuple[int, int, int]]:
        """(line number, offset, length) of every non-blank line of the input."""
        lines, offset = [], 0
        with open(input_path, "rb") as file:
            for number, raw in enumerate(file, start=1):
                if raw.strip():
                    lines.append((number, offset, len(raw)))
                offset += len(raw)
        return lines

    # -- output lines -----------------------------------------------------------------------

    def line_id() -> str:
        return f"batch_req_{uuid.uuid4().hex}"

    def failure(custom_id: Any, code: str, message: str, number: int) -> dict[str, Any]:
        return {
            "id": line_id(),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": f"{message} (line {number})"},
        }

    def answered(custom_id: Any, status: int, request_id: str, body: Any) -> dict[str, Any]:
        return {
            "id": line_id(),
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }

    def succeeded(line: dict[str, Any]) -> bool:
        response = line.get("response")
        return isinstance(response, dict) and int(response.get("status_code") or 0) < 400

    def prepare(number: int, text: bytes) -> dict[str, Any]:
        """A runnable request {number, custom_id, url, body}, or the output line of its failure."""
        try:
            line = json.loads(text)
        except ValueError as error:
            return {"failed": failure(None, "invalid_json", f"Not valid JSON: {error}", number)}
        if not isinstance(line, dict):
            return {"failed": failure(None, "invalid_json", "Not a JSON object", number)}
        custom_id, url, body = line.get("custom_id"), line.get("url"), line.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            return {"failed": failure(None, "invalid_request", "No custom_id", number)}
        if not isinstance(body, dict):
            return {"failed": failure(custom_id, "invalid_request", "No body object", number)}
        if str(line.get("method") or "POST").upper() != "POST":
            message = f"Method {line.get('method')!r} is not supported, only POST"
            return {"failed": failure(custom_id, "invalid_request", message, number)}
        if url not in endpoints:
            message = f"url {url!r} is not one of {', '.join(endpoints)}"
            return {"failed": failure(custom_id, "invalid_url", message, number)}
        if runner == "vllm" and url == "/v1/completions":
            message = "vLLM's batch runner does not serve /v1/completions on this endpoint"
            return {"failed": failure(custom_id, "unsupported_url", message, number)}
        if body.get("model") not in (None, model):
            message = f"body.model {body.get('model')!r} is not this batch's model {model!r}"
            return {"failed": failure(custom_id, "model_mismatch", message, number)}
        if body.get("stream"):
            message = "stream is not supported in a batch"
            return {"failed": failure(custom_id, "invalid_request", message, number)}
        body = {**body, "model": model}
        # A line that names no max_tokens is sent the endpoint's cap (vLLM's own 16 for text
        # completions within it), so no line can run past the cap or the owner's budget.
        fitted = bool(max_tokens) and url != "/v1/embeddings"
        fitted = fitted and body.get("max_tokens") is None
        fitted = fitted and body.get("max_completion_tokens") is None
        if fitted:
            cap = int(max_tokens or 0)
            body["max_tokens"] = min(cap, 16) if url == "/v1/completions" else cap
        return {"number": number, "custom_id": custom_id, "url": url, "body": body,
                "fitted": fitted, "size": len(text)}

    # -- runners ----------------------------------------------------------------------------

    def run_http(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"

        def call(item: dict[str, Any]) -> dict[str, Any]:
            target = base_url + item["url"][len("/v1") :]
            data = json.dumps(item["body"]).encode()
            request = urllib.request.Request(target, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    status, raw = response.status, response.read()
                    request_id = response.headers.get("x-request-id")
            except urllib.error.HTTPError as error:
                status, raw = error.code, error.read()
                request_id = error.headers.get("x-request-id") if error.headers else None
                error.close()
            except (urllib.error.URLError, OSError, ValueError) as error:
                reason = getattr(error, "reason", error)
                timed_out = isinstance(error, TimeoutError) or isinstance(reason, TimeoutError)
                code = "timeout" if timed_out else "backend_unreachable"
                # The address and the exception are for the endpoint's log; users read words.
                print(f"vLLM at {base_url} failed: {reason!r}", file=sys.stderr)
                words = "did not answer in time" if timed_out else "could not be reached"
                message = f"The model server {words}"
                return failure(item["custom_id"], code, message, item["number"])
            try:
                body = json.loads(raw)
            except ValueError:
                kind = "server_error" if status >= 500 else "invalid_request_error"
                text = raw.decode(errors="replace")[:2000]
                body = {"error": {"message": text, "type": kind, "param": None, "code": status}}
            return answered(
                item["custom_id"], status, request_id or f"req_{uuid.uuid4().hex}", body
            )

        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(call, requests))
        codes = {(line.get("error") or {}).get("code") for line in results}
        if results and codes == {"backend_unreachable"}:
            raise BatchError("backend_unreachable", results[0]["error"]["message"])
        return results

    def from_vllm(record: Any, custom_id: str, number: int) -> dict[str, Any]:
        """One of vLLM run_batch's output lines in the OpenAI shape (errors in the body)."""
        if not isinstance(record, dict):
            return failure(custom_id, "runner_error", "vLLM wrote no output for this line", number)
        response, error = record.get("response"), record.get("error")
        if not isinstance(response, dict):
            message = f"vLLM failed this line: {error}"
            return failure(custom_id, "runner_error", message, number)
        status = int(response.get("status_code") or 200)
        request_id = str(response.get("request_id") or f"vllm-batch-{uuid.uuid4().hex}")
        body = response.get("body")
        if error is None and isinstance(body, dict) and status < 400:
            return answered(custom_id, status, request_id, body)
        # vLLM puts the error beside a body-less response: a string (its own failures, status
        # 400) or an ErrorResponse, `{"error": {...}}` or (before 0.9) `{"object": "error", ...}`.
        detail = error.get("error", error) if isinstance(error, dict) else error
        if not isinstance(detail, dict):
            detail = {"message": str(detail) if detail else "vLLM failed this request."}
        code = detail.get("code")
        if status < 400:
            status = code if isinstance(code, int) and code >= 400 else 500
        kind = "server_error" if status >= 500 else "invalid_request_error"
        body = {
            "error": {
                "message": str(detail.get("message") or "vLLM failed this request."),
                "type": detail.get("type") or kind,
                "param": detail.get("param"),
                "code": code if code is not None else status,
            }
        }
        return answered(custom_id, status, request_id, body)

    def tail(path: str, limit: int = 2000) -> str:
        try:
            with open(path, "rb") as file:
                file.seek(max(0, os.path.getsize(path) - limit))
                return file.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def run_vllm(k: int, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        chunk_in = os.path.join(work, f"in-{k:06d}.jsonl")
        chunk_out = os.path.join(work, f".vllm-out-{k:06d}.jsonl")
        out_log = os.path.join(work, f"runner-{k:06d}.out")
        err_log = os.path.join(work, f"runner-{k:06d}.err")
        write_lines(
            chunk_in,
            [
                {"custom_id": r["custom_id"], "method": "POST", "url": r["url"], "body": r["body"]}
                for r in requests
            ],
        )
        command = [
            os.environ.get("FIRST_BATCH_PYTHON") or sys.executable,
            "-m",
            "vllm.entrypoints.openai.run_batch",
            "-i",
            chunk_in,
            "-o",
            chunk_out,
            "--model",
            model,
            *shlex.split(os.environ.get("FIRST_BATCH_RUNNER_ARGS") or ""),
        ]
        with open(out_log, "wb") as out, open(err_log, "wb") as err:
            try:
                finished = subprocess.run(
                    command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, check=False
                )
            except OSError as error:
                raise BatchError(
                    "runner_failed", f"vLLM's run_batch could not start: {error}"
                ) from None
        if finished.returncode != 0:
            said = tail(err_log) or tail(out_log) or "(no output)"
            raise BatchError(
                "runner_failed",
                f"vLLM's run_batch exited with status {finished.returncode} on chunk {k}: {said}",
            )
        try:
            records = read_lines(chunk_out)
        except (OSError, ValueError) as error:
            message = f"vLLM's run_batch output of chunk {k} is unreadable: {error}"
            raise BatchError("runner_failed", message) from None
        by_id: dict[str, list[Any]] = {}
        for record in records:
            if isinstance(record, dict):
                by_id.setdefault(str(record.get("custom_id")), []).append(record)
        results = []
        for r in requests:  # vLLM keeps the order; matching by custom_id does not rely on it
            found = by_id.get(r["custom_id"]) or [None]
            results.append(from_vllm(found.pop(0), r["custom_id"], r["number"]))
        for path in (chunk_in, chunk_out, out_log, err_log):
            with contextlib.suppress(OSError):
                os.unlink(path)
        return results

    # -- chunks -----------------------------------------------------------------------------

    def checkpoint(k: int) -> str:
        return os.path.join(work, f"out-{k:06d}.jsonl")

    def run_chunk(k: int, index: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
        prepared = []
        with open(input_path, "rb") as file:
            for number, offset, length in index[k * chunk_lines : (k + 1) * chunk_lines]:
                file.seek(offset)
                prepared.append(prepare(number, file.read(length)))
        requests = [p for p in prepared if "failed" not in p]
        ran: dict[int, dict[str, Any]] = {}
        while requests:
            # Lines run in groups whose tokens the owner's budget grants (all at once without
            # a budget); a line that no minute could hold fails as it would interactively.
            group, limit = grant_for(requests)
            if not group:
                line = requests.pop(0)
                message = (
                    f"The line may use {need(line)} tokens (prompt estimate plus max_tokens), "
                    f"more than the {limit} tokens per minute its owner may use"
                )
                ran[line["number"]] = failure(
                    line["custom_id"], "request_too_large", message, line["number"]
                )
                continue
            lines = fit_to_context(k, group, run_lines(k, group))
            if token_budget:
                budget["used"] = sum(tokens_used(line) for line in lines)
            ran.update(zip((item["number"] for item in group), lines, strict=True))
            requests = requests[len(group) :]
        return [p["failed"] if "failed" in p else ran[p["number"]] for p in prepared]

    def run_lines(k: int, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return run_http(requests) if runner == "http" else run_vllm(k, requests)

    # -- the owner's token budget -----------------------------------------------------------

    budget: dict[str, Any] = {"used": None, "limit": None}

    def need(item: dict[str, Any]) -> int:
        """The most tokens a line may use: its prompt's estimate and its completions."""
        body = item["body"]
        completion = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        if item["url"] == "/v1/embeddings":
            completion = 0
        choices = body.get("n") if isinstance(body.get("n"), int) else 1
        return -(-int(item["size"]) // 4) + int(completion) * max(1, choices)

    def tokens_used(line: dict[str, Any]) -> int:
        body = (line.get("response") or {}).get("body")
        usage = body.get("usage") if isinstance(body, dict) else None
        total = usage.get("total_tokens") if isinstance(usage, dict) else None
        return total if isinstance(total, int) and total >= 0 else 0

    def ask(want: int) -> dict[str, Any]:
        """Ask the gateway for `want` tokens (settling the last grant with what it used)."""
        used, budget["used"] = budget["used"], None
        event = {"batch_id": batch_id, "event": "tokens", "attempt": attempt, "want": want}
        status, reply = post({**event, "used": used})
        if status is None or status >= 400 or not isinstance(reply, dict):
            raise BatchError("callback_refused", f"The gateway refused tokens (HTTP {status}).")
        if reply.get("continue") is False:
            raise Stopped()
        return reply

    def grant_for(requests: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
        """The longest run of the next lines the owner's budget grants now, waiting for it as
        long as it takes; [] when the first line alone is more than a minute allows."""
        if not token_budget:
            return list(requests), None
        while True:
            group: list[dict[str, Any]] = []
            want = 0
            for item in requests:
                limit = budget["limit"]
                if group and limit is not None and want + need(item) > limit:
                    break
                group.append(item)
                want += need(item)
            reply = ask(want)
            if reply.get("granted"):
                return group, reply.get("limit")
            budget["limit"] = limit = reply.get("limit")
            if isinstance(limit, int) and want > limit:
                if len(group) == 1:
                    return [], limit
                continue  # fewer lines, now that the limit is known
            # Asked again every few seconds, not only at the next minute, so a cancel is seen.
            time.sleep(min(5.0, max(0.5, float(reply.get("retry_in") or 1))))

    # -- a max_tokens too large for the model's context ---------------------------------------

    def room_in_context(line: dict[str, Any], sent: int) -> int | None:
        """From vLLM's refusal of a max_tokens too large for the context, the largest that fits
        (the same reading as compute_funcs.inference's: each function ships on its own)."""
        response = line.get("response") or {}
        body = response.get("body")
        error = body.get("error", body) if isinstance(body, dict) else {}
        message = str(error.get("message") if isinstance(error, dict) else "")
        found = re.search(
            r"maximum context length is (\d+) tokens.*?(?:has (\d+) input tokens|\((\d+) in the)",
            message,
            re.S,
        )
        if response.get("status_code") != 400 or not found:
            return None
        room = int(found[1]) - int(found[2] or found[3])
        return room if 0 < room < sent else None

    def fit_to_context(
        k: int, requests: list[dict[str, Any]], lines: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Lines sent the cap that vLLM refused as too large for the context run once more
        with the room left."""
        again: list[tuple[int, dict[str, Any]]] = []
        for i, (item, line) in enumerate(zip(requests, lines, strict=True)):
            sent = int(item["body"].get("max_tokens") or 0)
            room = room_in_context(line, sent) if item["fitted"] else None
            if room is not None:
                again.append((i, {**item, "body": {**item["body"], "max_tokens": room}}))
        if again:
            lines = list(lines)
            redone = run_lines(k, [item for _, item in again])
            for (i, _), line in zip(again, redone, strict=True):
                lines[i] = line
        return lines

    # -- the run ----------------------------------------------------------------------------

    counts = {
        "completed": 0,
        "failed": 0,
        "total": 0,
        "chunks_done": 0,
        "chunks_total": 0,
        "resumed_lines": 0,
    }
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    files: dict[str, dict[str, Any]] = {
        "output": {"lines": 0, "bytes": 0, "path": None},
        "errors": {"lines": 0, "bytes": 0, "path": None},
    }
    outcome, error_info, input_ready = "completed", None, False

    def progress() -> bool:
        """Report progress; False when the gateway wants the run to stop."""
        nonlocal error_info
        status, reply = post(
            {"batch_id": batch_id, "event": "progress", "attempt": attempt, **counts}
        )
        if status is not None and status >= 400:
            error_info = {
                "code": "callback_refused",
                "message": f"The gateway refused the progress callback (HTTP {status}).",
            }
            return False
        return not (isinstance(reply, dict) and reply.get("continue") is False)

    try:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", batch_id) or batch_id.strip(".") == "":
            raise BatchError("invalid_batch_id", f"The batch id {batch_id!r} is not a file name.")
        if runner not in ("vllm", "http"):
            message = f"FIRST_BATCH_RUNNER={runner!r} is not vllm or http."
            raise BatchError("invalid_runner", message)
        os.makedirs(work, exist_ok=True)
        write_json(
            os.path.join(work, "owner.json"),
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "attempt": attempt,
                "started": time.time(),
            },
        )
        if not isinstance(output, dict) or not (output.get("upload") or output.get("folder")):
            raise BatchError("invalid_output", "The output asks for neither upload nor a folder.")
        if output.get("folder"):  # refused now, not after hours of inference
            allowed(output["folder"], "output")
        fetch_input()
        input_ready = True
        index = index_input()
        counts["total"] = len(index)
        counts["chunks_total"] = chunks_total = -(-len(index) // chunk_lines)
        plan = {
            "chunk_lines": chunk_lines,
            "total": len(index),
            "bytes": os.path.getsize(input_path),
        }
        plan_path = os.path.join(work, "plan.json")
        try:
            with open(plan_path, encoding="utf-8") as file:
                same_plan = json.load(file) == plan
        except (OSError, ValueError):
            same_plan = False
        if not same_plan:  # checkpoints cut another way cannot be resumed
            for name in os.listdir(work):
                if re.fullmatch(r"out-\d{6}\.jsonl", name):
                    os.unlink(os.path.join(work, name))
            write_json(plan_path, plan)
        for k in range(chunks_total):
            if os.path.exists(checkpoint(k)):
                lines = read_lines(checkpoint(k))
                done = sum(1 for line in lines if succeeded(line))
                counts["completed"] += done
                counts["failed"] += len(lines) - done
                counts["resumed_lines"] += len(lines)
                counts["chunks_done"] += 1
        if not progress():
            outcome = "cancelled"
        else:
            for k in range(chunks_total):
                if os.path.exists(checkpoint(k)):
                    continue
                lines = run_chunk(k, index)
                write_lines(checkpoint(k), lines)
                done = sum(1 for line in lines if succeeded(line))
                counts["completed"] += done
                counts["failed"] += len(lines) - done
                counts["chunks_done"] += 1
                if not progress():
                    outcome = "cancelled"
                    break
        if budget["used"] is not None:  # the last grant's use, so its unused tokens come back
            with contextlib.suppress(Stopped, BatchError):
                ask(0)
    except Stopped:
        outcome = "cancelled"
    except BatchError as problem:
        outcome, error_info = "failed", {"code": problem.code, "message": problem.message}
    except Exception as problem:  # a bug or a full disk: reported, not hidden
        outcome = "failed"
        print(f"batch {batch_id} failed: {problem!r}", file=sys.stderr)
        error_info = {"code": "internal_error", "message": "The batch function failed."}

    # -- finalize: merge what is done, deliver it (also partial results), report -------------

    if input_ready:
        try:
            merged = {
                "output": os.path.join(work, "output.jsonl"),
                "errors": os.path.join(work, "errors.jsonl"),
            }
            with (
                open(merged["output"] + ".part", "wb") as good,
                open(merged["errors"] + ".part", "wb") as bad,
            ):
                for k in range(counts["chunks_total"]):
                    if not os.path.exists(checkpoint(k)):
                        continue
                    for line in read_lines(checkpoint(k)):
                        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
                        if succeeded(line):
                            good.write(data)
                            files["output"]["lines"] += 1
                            body = line["response"].get("body")
                            used = body.get("usage") if isinstance(body, dict) else None
                            for key in usage:
                                value = used.get(key) if isinstance(used, dict) else None
                                usage[key] += value if isinstance(value, int) else 0
                        else:
                            bad.write(data)
                            files["errors"]["lines"] += 1
            for name, path in merged.items():
                os.replace(path + ".part", path)
                files[name]["bytes"] = os.path.getsize(path)
            counts["completed"] = files["output"]["lines"]
            counts["failed"] = files["errors"]["lines"]
            if output.get("folder"):
                target = allowed(output["folder"], "output")
                os.makedirs(target, exist_ok=True)
                for name, path in merged.items():
                    destination = os.path.join(target, f"{batch_id}_{name}.jsonl")
                    with open(path, "rb") as source:
                        write_atomic(
                            destination, lambda out, source=source: shutil.copyfileobj(source, out)
                        )
                    files[name]["path"] = destination
            else:
                status, reply = post({"batch_id": batch_id, "event": "upload", "attempt": attempt})
                reply = reply if isinstance(reply, dict) else {}
                if status is not None and status >= 400:
                    message = f"The gateway refused the upload callback (HTTP {status})."
                    raise BatchError("callback_refused", message)
                if reply.get("output_url") or reply.get("error_url"):
                    extra = {str(k): str(v) for k, v in (reply.get("headers") or {}).items()}
                    for name, key in (("output", "output_url"), ("errors", "error_url")):
                        if reply.get(key):
                            put_file(str(reply[key]), merged[name], extra)
                elif reply.get("continue") is not False:
                    raise BatchError(
                        "upload_failed",
                        "The gateway gave no upload urls"
                        f" ({'HTTP ' + str(status) if status else 'unreachable'}).",
                    )
        except BatchError as problem:
            error_info = {"code": problem.code, "message": problem.message}
            outcome = "failed" if outcome == "completed" else outcome
        except Exception as problem:
            print(f"batch {batch_id} failed to deliver: {problem!r}", file=sys.stderr)
            error_info = {"code": "internal_error", "message": "The batch function failed."}
            outcome = "failed" if outcome == "completed" else outcome

    report = {
        "batch_id": batch_id,
        "event": "done",
        "attempt": attempt,
        "outcome": outcome,
        "completed": counts["completed"],
        "failed": counts["failed"],
        "total": counts["total"],
        "resumed_lines": counts["resumed_lines"],
        "usage": usage,
        "output": files["output"],
        "errors": files["errors"],
        "error": error_info,
    }
    status, _ = post(report)
    if outcome == "completed" and status is not None and 200 <= status < 300:
        shutil.rmtree(work, ignore_errors=True)
    return report
