"""The inference function that runs ON a cluster's Globus Compute endpoint.

It is serialized and shipped by Globus Compute, so it imports nothing from the gateway and only
the standard library: everything it needs is inside the function body. vLLM listens on the
node at `VLLM_BASE_URL` (default `http://127.0.0.1:8000/v1`) with `VLLM_API_KEY`, both from the
endpoint's environment.

The result is POSTed to the gateway's callback URL with the per-request callback token, and
also returned, so the reconciler can recover it from Globus Compute if the callback is lost.
"""

from __future__ import annotations

from typing import Any


def vllm_inference(
    payload: dict[str, Any],
    openai_path: str,
    request_id: str,
    callback_url: str,
    callback_token: str,
    fitted_max_tokens: bool = False,
) -> dict[str, Any]:
    """Run one OpenAI request against the node's vLLM, POST the result to the callback url with the
    callback token, and return it: `{request_id, status_code, body, timings}`.

    `fitted_max_tokens`: the gateway chose `max_tokens` (the caller named none); if vLLM refuses
    it as too large for the model's context, it is sent once more lowered to the room left."""
    import json
    import os
    import re
    import sys
    import time
    import urllib.error
    import urllib.request

    base_url = os.environ.get("VLLM_BASE_URL", "http://127.0.0.1:8000/v1").rstrip("/")
    headers = {"Content-Type": "application/json"}
    api_key = os.environ.get("VLLM_API_KEY")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    timeout = float(os.environ.get("VLLM_TIMEOUT_SECONDS", "3600"))
    # The Responses API names the most tokens to generate `max_output_tokens`.
    max_key = "max_output_tokens" if openai_path.strip("/") == "responses" else "max_tokens"

    def post(url: str, body: dict[str, Any], extra: dict[str, str], wait: float) -> tuple[int, Any]:
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={**headers, **extra}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=wait) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                return error.code, json.loads(raw)
            except ValueError:
                return error.code, {"error": {"message": raw.decode(errors="replace")[:2000]}}

    def room_in_context(status: int, body: Any) -> int | None:
        """From vLLM's refusal of a max_tokens too large for the context, the largest that fits
        (both wordings: "... and your request has M input tokens" and "(M in the messages")."""
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

    started = time.time()
    try:
        status_code, body = post(f"{base_url}/{openai_path}", payload, {}, timeout)
        if (room := room_in_context(status_code, body)) is not None:
            payload = {**payload, max_key: room}
            status_code, body = post(f"{base_url}/{openai_path}", payload, {}, timeout)
    except (urllib.error.URLError, OSError, ValueError) as error:
        # The address and the exception are for the endpoint's log; the client gets words.
        print(f"vLLM at {base_url} could not be reached: {error!r}", file=sys.stderr)
        status_code, body = (
            502,
            {
                "error": {
                    "message": "The model server could not be reached.",
                    "type": "server_error",
                    "param": None,
                    "code": "backend_unreachable",
                }
            },
        )
    result = {
        "request_id": request_id,
        "status_code": status_code,
        "body": body,
        "timings": {"started": started, "finished": time.time()},
    }

    # The callback is best effort: a lost one is recovered by the reconciler from our return value.
    callback_headers = {"Authorization": f"Bearer {callback_token}"}
    for attempt in range(4):
        try:
            code, _ = post(callback_url, result, callback_headers, 30.0)
            if code < 500:
                break
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2 * 2**attempt)
    return result
