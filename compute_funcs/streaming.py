"""The streaming inference function that runs ON a cluster's Globus Compute endpoint.

Like `compute_funcs.inference` it is serialized and shipped, so it uses only the standard library,
imported inside the body, with the same `VLLM_BASE_URL` / `VLLM_API_KEY` environment.

It reads vLLM's SSE stream and relays the `data:` payloads to the gateway's stream callback as
numbered batches, `{"request_id", "seq", "chunks", "done", "error", "usage"}`. A reader thread
drains vLLM while this thread posts batches, so a slow callback never stalls vLLM's socket. A batch
leaves once it has 16 lines or its oldest line is 20 ms old, so the first token is not held back;
lines that piled up while a post was in flight leave together, so a slow link cannot make the relay
fall ever further behind the model. The callback answers `{"continue": bool}`: on `false` (the
client went away) the vLLM connection is shut at once and one last `done` batch reports the usage
of what was generated. The assembled answer is also returned, for the reconciler.
"""

from __future__ import annotations

from typing import Any


def vllm_streaming(
    payload: dict[str, Any],
    openai_path: str,
    request_id: str,
    callback_url: str,
    callback_token: str,
    fitted_max_tokens: bool = False,
) -> dict[str, Any]:
    """Stream one OpenAI request from the node's vLLM to the stream callback as numbered chunk
    batches, stop when the gateway says the client left, and return the assembled answer.

    `fitted_max_tokens`: the gateway chose `max_tokens` (the caller named none); if vLLM refuses
    it as too large for the model's context, it is sent once more lowered to the room left."""
    import http.client
    import json
    import os
    import queue
    import re
    import socket
    import sys
    import threading
    import time
    import urllib.parse

    flush_lines, flush_after_s = 16, 0.020
    # A DynamoDB item holds 400 KB; a backlog batch stays well below it.
    backlog_lines, backlog_bytes = 512, 64_000

    base_url = os.environ.get("VLLM_BASE_URL", "http://127.0.0.1:8000/v1").rstrip("/")
    target = urllib.parse.urlsplit(f"{base_url}/{openai_path.strip('/')}")
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key := os.environ.get("VLLM_API_KEY"):
        headers["Authorization"] = f"Bearer {api_key}"
    timeout = float(os.environ.get("VLLM_TIMEOUT_SECONDS", "3600"))
    # The Responses API names the most tokens to generate `max_output_tokens`.
    max_key = "max_output_tokens" if openai_path.strip("/") == "responses" else "max_tokens"
    # The Responses and Messages APIs stream named events (`event:` + `data:` with a `type`),
    # end with a terminal event rather than `[DONE]`, and always carry their usage.
    route = openai_path.strip("/")
    named_events = route in ("responses", "messages")
    terminal = {
        "response.completed",
        "response.incomplete",
        "response.failed",
        "message_stop",
    }
    if named_events:
        request_body = json.dumps({**payload, "stream": True}).encode()
    else:
        # Usage is always asked for, so it can be billed; the gateway decides what the client
        # sees. On every chunk (the running count): a stream cut short by its client is billed
        # its prompt too, which only vLLM knows.
        options = {
            **(payload.get("stream_options") or {}),
            "include_usage": True,
            "continuous_usage_stats": True,
        }
        request_body = json.dumps({**payload, "stream": True, "stream_options": options}).encode()

    def room_in_context(status: int, body: Any) -> int | None:
        """From vLLM's refusal of a max_tokens too large for the context, the largest that fits
        (both wordings: "... and your request has M input tokens" and "(M in the messages").
        The same reading as compute_funcs.inference's: each function ships on its own."""
        if status != 400 or not fitted_max_tokens:
            return None
        error = body.get("error", body) if isinstance(body, dict) else {}
        message = str(error.get("message") if isinstance(error, dict) else "")
        found = re.search(
            r"maximum context length is (\d+) tokens.*?(?:has (\d+) input tokens|\((\d+) in the)",
            message,
            re.S,
        )
        if not found:
            return None
        room = int(found[1]) - int(found[2] or found[3])
        return room if 0 < room < int(payload.get(max_key) or 0) else None

    events: queue.Queue[tuple[Any, ...]] = queue.Queue()
    stop = threading.Event()
    state: dict[str, Any] = {
        "chunks": [],
        "usage": None,
        "generated": 0,
        "sock": None,
        "ended": False,  # the terminal event of a named-event stream came
    }

    def openai_error(body: Any, status: int, fallback: str, code: Any = None) -> dict[str, Any]:
        error = body.get("error", body) if isinstance(body, dict) else body
        if not isinstance(error, dict):  # vLLM's 401 is `{"error": "Unauthorized"}`
            error = {"message": str(error) if error else fallback}
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return {
            "message": str(error.get("message") or fallback),
            "type": error.get("type") or kind,
            "param": error.get("param"),
            "code": error.get("code", code),
        }

    def dispatch(text: str) -> bool:
        """Relay one `data:` payload; False at an error event, which ends the stream."""
        try:
            chunk = json.loads(text)
        except ValueError:
            return True
        if not isinstance(chunk, dict):
            return True
        if chunk.get("error") is not None or chunk.get("type") == "error":
            failure = chunk.get("error") if chunk.get("error") is not None else chunk
            code = failure.get("code") if isinstance(failure, dict) else None
            status = code if isinstance(code, int) and code >= 400 else 500
            error = openai_error({"error": failure}, status, "vLLM failed mid-stream.")
            events.put(("error", status, error))
            return False
        if named_events:
            named_event(chunk)
        elif chunk.get("usage"):
            state["usage"] = chunk["usage"]
        for part in chunk.get("choices") or []:
            delta = part.get("delta") or {}
            if part.get("text") or any(
                delta.get(k) for k in ("content", "tool_calls", "reasoning_content")
            ):
                state["generated"] += 1  # vLLM emits about one token per content chunk
        state["chunks"].append(text)
        events.put(("data", text, time.monotonic()))
        return True

    def named_event(chunk: dict[str, Any]) -> None:
        """Usage, generated tokens and the end, from a Responses or Messages stream's event:
        `response.completed` carries the whole usage; Anthropic's `message_start` the input
        tokens and `message_delta` the output tokens so far."""
        kind = str(chunk.get("type") or "")
        usage = chunk.get("usage")
        if kind.startswith("response.") and isinstance(chunk.get("response"), dict):
            usage = chunk["response"].get("usage")
        elif kind == "message_start" and isinstance(chunk.get("message"), dict):
            usage = chunk["message"].get("usage")
        if isinstance(usage, dict):
            known = {k: v for k, v in usage.items() if v is not None}
            state["usage"] = {**(state["usage"] or {}), **known}
        if kind.endswith(".delta") or kind == "content_block_delta":
            state["generated"] += 1  # about one token per delta event
        if kind in terminal:
            state["ended"] = True

    def read() -> None:
        secure = target.scheme == "https"
        kind = http.client.HTTPSConnection if secure else http.client.HTTPConnection
        connection = kind(target.hostname or "127.0.0.1", target.port, timeout=timeout)
        response = None
        body_sent = request_body
        try:
            connection.connect()
            state["sock"] = connection.sock  # so a cancel can shut it from the other thread
            if stop.is_set():
                return
            path = target.path + (f"?{target.query}" if target.query else "")
            connection.request("POST", path, body=body_sent, headers=headers)
            response = connection.getresponse()
            for attempt in (1, 2):
                if response.status < 400:
                    break
                raw = response.read()
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")[:2000]
                room = room_in_context(response.status, body) if attempt == 1 else None
                if room is None:
                    message = f"vLLM answered HTTP {response.status}."
                    # The status is the code where vLLM's body names none (Anthropic's shape).
                    failure = openai_error(body, response.status, message, response.status)
                    events.put(("error", response.status, failure))
                    return
                body_sent = json.dumps({**json.loads(body_sent), max_key: room}).encode()
                connection.request("POST", path, body=body_sent, headers=headers)
                response = connection.getresponse()
                state["sock"] = connection.sock  # a closed connection was opened anew
            lines: list[str] = []
            while not stop.is_set():
                raw = response.readline()
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data:"):
                    lines.append(line[5:].removeprefix(" "))
                elif lines and not line:  # a blank line ends the event (so does the end of input)
                    text, lines = "\n".join(lines), []
                    if text == "[DONE]" or not dispatch(text) or state["ended"]:
                        return
                if not raw:
                    break
            if not stop.is_set() and not state["ended"]:
                events.put(
                    (
                        "error",
                        502,
                        openai_error(
                            None,
                            502,
                            "vLLM closed the stream before it finished.",
                            "upstream_error",
                        ),
                    )
                )
        except (OSError, http.client.HTTPException, ValueError) as error:
            if not stop.is_set():
                # The address and the exception are for the endpoint's log, not the client.
                print(f"vLLM at {base_url} failed: {error!r}", file=sys.stderr)
                message = "The model server failed while streaming."
                code = "backend_unreachable" if response is None else "upstream_error"
                events.put(("error", 502, openai_error(None, 502, message, code)))
        finally:
            connection.close()
            events.put(("end",))

    def abort() -> None:
        stop.set()
        try:
            if state["sock"] is not None:
                state["sock"].shutdown(socket.SHUT_RDWR)  # wakes the reader out of recv()
        except OSError:
            pass

    def usage_now() -> dict[str, Any] | None:
        if named_events and state["usage"]:
            usage = dict(state["usage"])
            if not state["ended"]:  # stopped early: the output so far is what was generated
                so_far = int(usage.get("output_tokens") or 0)
                usage["output_tokens"] = max(so_far, state["generated"])
            return usage
        if state["usage"]:
            return dict(state["usage"])
        if not state["generated"]:
            return None
        # Stopped before vLLM sent any usage (a vLLM without continuous usage): count what it
        # generated (the prompt is unknown here).
        generated = state["generated"]
        return {"prompt_tokens": 0, "completion_tokens": generated, "total_tokens": generated}

    seq = 0
    # One kept-alive connection for every batch: a new one per batch (a TCP and, on AWS, a TLS
    # handshake with API Gateway) would hold each batch, the last one too, behind a handshake.
    callback = urllib.parse.urlsplit(callback_url)
    callback_path = callback.path + (f"?{callback.query}" if callback.query else "")
    poster: dict[str, Any] = {"connection": None}

    def post(data: bytes, auth: dict[str, str]) -> tuple[int, bytes]:
        """POST on the kept connection; a failed one is closed (the next post opens anew)."""
        connection = poster["connection"]
        reused = connection is not None
        if connection is None:
            kind = (
                http.client.HTTPSConnection
                if callback.scheme == "https"
                else http.client.HTTPConnection
            )
            connection = kind(callback.hostname or "127.0.0.1", callback.port, timeout=30)
            poster["connection"] = connection
        try:
            connection.request("POST", callback_path, body=data, headers=auth)
            response = connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            connection.close()
            poster["connection"] = None
            if reused:  # the server closed an idle connection: once more on a new one
                return post(data, auth)
            raise

    def send(chunks: list[str], done: bool, error: dict[str, Any] | None) -> str:
        """Post one batch: "continue", "stop" (client gone), "refused" (4xx) or "failed"."""
        nonlocal seq
        batch = {
            "request_id": request_id,
            "seq": seq,
            "chunks": chunks,
            "done": done,
            "error": error,
            "usage": usage_now() if done else None,
        }
        seq += 1
        data = json.dumps(batch, separators=(",", ":")).encode()
        auth = {"Content-Type": "application/json", "Authorization": f"Bearer {callback_token}"}
        for attempt in range(5):
            try:
                status, raw = post(data, auth)
            except (OSError, http.client.HTTPException):
                status, raw = 0, b""
            if 400 <= status < 500:
                return "refused"
            if 200 <= status < 300:
                try:
                    reply = json.loads(raw or b"{}")
                except ValueError:
                    reply = {}
                stopped = isinstance(reply, dict) and reply.get("continue") is False
                return "stop" if stopped else "continue"
            # The callback is idempotent on (request_id, seq), so resending the same bytes is safe.
            if attempt < 4:
                time.sleep(0.05 * 2**attempt)
        return "failed"

    def assemble(chunks: list[str]) -> dict[str, Any]:
        """The non-streamed answer the chunks add up to (`chat.completion` or `text_completion`,
        a Responses API `response`, an Anthropic `message`)."""
        if route == "responses":
            return assemble_response(chunks)
        if route == "messages":
            return assemble_message(chunks)
        chat = openai_path.strip("/").endswith("chat/completions")
        head: dict[str, Any] = {}
        usage: Any = None
        choices: dict[int, dict[str, Any]] = {}
        for text in chunks:
            chunk = json.loads(text)
            for key in ("id", "created", "model", "system_fingerprint"):
                if key in chunk and key not in head:
                    head[key] = chunk[key]
            usage = chunk.get("usage") or usage
            for part in chunk.get("choices") or []:
                choice = choices.setdefault(
                    part.get("index", 0),
                    {
                        "parts": [],
                        "reasoning": [],
                        "tools": {},
                        "role": "assistant",
                        "logprobs": None,
                        "finish_reason": None,
                        "stop_reason": None,
                    },
                )
                delta = part.get("delta") or {}
                choice["role"] = delta.get("role") or choice["role"]
                choice["parts"].append((delta.get("content") if chat else part.get("text")) or "")
                choice["reasoning"].append(delta.get("reasoning_content") or "")
                for call in delta.get("tool_calls") or []:
                    slot = choice["tools"].setdefault(
                        call.get("index", 0),
                        {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                    )
                    slot["id"] = call.get("id") or slot["id"]
                    function = call.get("function") or {}
                    slot["function"]["name"] += function.get("name") or ""
                    slot["function"]["arguments"] += function.get("arguments") or ""
                if isinstance(part.get("logprobs"), dict):
                    merged = choice["logprobs"] = choice["logprobs"] or {}
                    for key, value in part["logprobs"].items():
                        if isinstance(value, list):
                            merged.setdefault(key, []).extend(value)
                        else:
                            merged[key] = value
                for key in ("finish_reason", "stop_reason"):
                    if part.get(key) is not None:
                        choice[key] = part[key]
        out: list[dict[str, Any]] = []
        for index, choice in sorted(choices.items()):
            text = "".join(choice["parts"])
            if chat:
                calls = [call for _, call in sorted(choice["tools"].items())]
                message: dict[str, Any] = {
                    "role": choice["role"],
                    "content": text,
                    "tool_calls": calls,
                }
                if any(choice["reasoning"]):
                    message["reasoning_content"] = "".join(choice["reasoning"])
                content: dict[str, Any] = {"message": message}
            else:
                content = {"text": text}
            out.append(
                {
                    "index": index,
                    **content,
                    "logprobs": choice["logprobs"],
                    "finish_reason": choice["finish_reason"],
                    "stop_reason": choice["stop_reason"],
                }
            )
        kind = "chat.completion" if chat else "text_completion"
        return {**head, "object": kind, "choices": out, "usage": usage}

    def assemble_response(chunks: list[str]) -> dict[str, Any]:
        """The `response` of the stream's last `response.*` event that carries one (the terminal
        event's is the whole answer)."""
        response: dict[str, Any] = {"object": "response", "output": [], "usage": None}
        for text in chunks:
            chunk = json.loads(text)
            if isinstance(chunk, dict) and isinstance(chunk.get("response"), dict):
                response = chunk["response"]
        return response

    def assemble_message(chunks: list[str]) -> dict[str, Any]:
        """Anthropic's `message`, rebuilt from `message_start`, the content blocks' events and
        `message_delta`."""
        message: dict[str, Any] = {"type": "message", "role": "assistant", "content": []}
        blocks: dict[int, dict[str, Any]] = {}
        for text in chunks:
            chunk = json.loads(text)
            kind = chunk.get("type") if isinstance(chunk, dict) else None
            if kind == "message_start":
                message = {**message, **chunk.get("message", {})}
            elif kind == "content_block_start":
                blocks[chunk.get("index", 0)] = dict(chunk.get("content_block") or {})
            elif kind == "content_block_delta":
                block = blocks.setdefault(chunk.get("index", 0), {"type": "text", "text": ""})
                delta = chunk.get("delta") or {}
                for key in ("text", "thinking", "partial_json", "signature"):
                    if isinstance(delta.get(key), str):
                        block[key] = block.get(key, "") + delta[key]
            elif kind == "message_delta":
                message.update(chunk.get("delta") or {})
                usage = {k: v for k, v in (chunk.get("usage") or {}).items() if v is not None}
                message["usage"] = {**(message.get("usage") or {}), **usage}
        content = []
        for _, block in sorted(blocks.items()):
            partial = block.pop("partial_json", None)
            if partial is not None:
                try:
                    block["input"] = json.loads(partial) if partial else {}
                except ValueError:
                    block["input"] = partial
            content.append(block)
        message["content"] = content
        return message

    started = time.time()
    reader = threading.Thread(target=read, name=f"vllm-sse-{request_id}", daemon=True)
    reader.start()
    pending: list[str] = []
    pending_bytes, oldest = 0, 0.0
    status, error, ended, outcome = 200, None, False, "continue"
    # The first token goes out alone, at once: time to first token is what a user feels. (Chat
    # streams open with a role-only chunk, so their first token is the second line.)
    # (Responses streams open with four events before the first delta, Messages with two.)
    lines_due = {"chat/completions": 2, "responses": 5, "messages": 3}.get(route, 1)
    while not ended:
        wait = None if not pending else max(0.0, oldest + flush_after_s - time.monotonic())
        try:
            item: tuple[Any, ...] | None = events.get(timeout=wait)
        except queue.Empty:
            item = None
        while item is not None:
            if item[0] == "data":
                oldest = oldest if pending else item[2]
                pending.append(item[1])
                pending_bytes += len(item[1])
            elif item[0] == "error":
                status, error = item[1], item[2]
            else:
                ended = True
                break
            behind = time.monotonic() - oldest >= flush_after_s
            if len(pending) >= (backlog_lines if behind else lines_due) or (
                pending_bytes >= backlog_bytes
            ):
                break
            try:
                item = events.get_nowait()
            except queue.Empty:
                item = None
        due = (
            len(pending) >= lines_due
            or pending_bytes >= backlog_bytes
            or (pending and time.monotonic() - oldest >= flush_after_s)
        )
        if not (ended or due):
            continue
        if outcome == "continue":  # after "failed", keep reading vLLM for the return value
            outcome = send(pending, ended, error if ended else None)
        pending, pending_bytes, lines_due = [], 0, flush_lines
        if outcome in ("stop", "refused"):
            abort()
            break
    cancelled = outcome in ("stop", "refused")
    reader.join(5.0)
    if outcome == "stop" and not ended:
        send([], True, None)  # the usage of what was generated, for a cancelled request
    if poster["connection"] is not None:
        poster["connection"].close()
    chunks = list(state["chunks"])
    return {
        "request_id": request_id,
        "status_code": status,
        "body": {"error": error} if error else assemble(chunks),
        "chunks": chunks,
        "cancelled": cancelled,
        "usage": usage_now(),
        "timings": {"started": started, "finished": time.time()},
    }
