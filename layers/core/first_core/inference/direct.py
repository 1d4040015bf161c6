"""Direct backends: an OpenAI-compatible HTTP API (a vLLM server, a provider) that the proxy calls
itself, with no Globus Compute task, callback or chunk table in between.

The caller meets the same gateway: authentication, groups and domains, routing and rate limits
(first_core.inference.submit, up to the reservation), then `upstream.prepare` builds the
upstream call (the model's upstream name, the gateway's key, the max_tokens it reserved, usage
asked for on a stream) and `answer` makes it on the event loop's one `httpx.AsyncClient`,
reused across the invocations of a warm Lambda. A non-streamed answer is returned as the
upstream sent it (its `model` put back to the gateway's name); a stream is relayed event by
event, with keep-alives, the usage chunk only for a client that asked for it, and the upstream
response closed when the client leaves. When it ends, the request is written once: its record
(already ended, with the answer and usage) and its usage record, side by side, awaited; its
reservation is settled beside the answer.

Long because: it is the whole direct path after the reservation, the call and its error
mapping, the stream relay and the one write at the end, kept together to read in one place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import ValidationError

from first_core import ratelimit
from first_core import usage as usage_module
from first_core.errors import (
    ComputeTimeoutError,
    GatewayError,
    ServiceUnavailableError,
    UpstreamError,
    public_message,
)
from first_core.inference import assemble, records
from first_core.inference.relay import _event
from first_core.inference.submit import Submission
from first_core.inference.upstream import DirectCall, client, timeout
from first_core.inference.wait import backend_error
from first_core.schemas.wire import answer_usage, chunk_error
from first_core.settings import get_settings
from first_core.usage import Usage

if TYPE_CHECKING:
    from first_core.auth import Caller

log = logging.getLogger("first.direct")

KEEPALIVE_SECONDS = 15.0
# Where the named-event streams (Responses, Messages) end.
_TERMINAL_EVENTS = {"response.completed", "response.incomplete", "response.failed", "message_stop"}
# What `answer` gives: a JSON body, or a stream's SSE events.
Answered = tuple[Any, AsyncGenerator[bytes, None] | None]


async def answer(submission: Submission, caller: Caller, headers: dict[str, str]) -> Answered:
    """The answer of a direct request: its body, or its stream's events (`headers`, the
    answer's, get what goes with them); the request is written once it ends (for a stream,
    when the relay ends)."""
    call = submission.direct
    assert call is not None
    end = _Ending(submission, caller, call)
    started = time.perf_counter()
    try:
        if call.stream:
            response = await _send(call, stream=True)
            events = _relay(response, call, end)
            headers.update({"cache-control": "no-store", "x-accel-buffering": "no"})
            return None, events
        response = await _send(call, stream=False)
        end.first_contact = time.time()
        body = _renamed(_json(response.content), call)
    except GatewayError as error:
        await end.write("timed_out" if error.status == 504 else "failed", error=error.message)
        raise
    except asyncio.CancelledError:  # the client left while the upstream was answering
        end.later("cancelled")
        raise
    answered = time.perf_counter()
    await end.write("completed", usage=_usage(body), response=body)
    headers["server-timing"] = (
        f"upstream;dur={(answered - started) * 1000:.1f}, "
        f"record;dur={(time.perf_counter() - answered) * 1000:.1f}"
    )
    return body, None


def never_sent(submission: Submission) -> None:
    """The client left before the upstream was called: its reservation is given back, on a
    thread (this runs in a done-callback, with no request record to end)."""
    call = submission.direct
    if call is not None and call.reservation:
        settle = (ratelimit.settle, call.reservation, 0)
        asyncio.get_running_loop().run_in_executor(None, _logged, submission.request_id, *settle)


async def _send(call: DirectCall, *, stream: bool) -> httpx.Response:
    """The upstream's response (a stream's still open), or the error it stands for."""
    http = client()
    request = http.build_request(
        "POST", call.url, content=call.body, headers=call.headers, timeout=timeout(call)
    )
    try:
        response = await http.send(request, stream=True)
        if response.status_code < 400 and stream:
            return response
        try:
            await response.aread()
        finally:
            await response.aclose()
    except httpx.TimeoutException:
        raise ComputeTimeoutError(
            f"The backend of '{call.gateway_model}' did not answer within {call.timeout:g} s."
        ) from None
    except httpx.HTTPError as error:
        log.warning("direct backend %s unreachable: %r", call.url, error)
        raise ServiceUnavailableError(
            f"The backend of '{call.gateway_model}' cannot be reached now. Retry later.",
            headers={"Retry-After": "5"},
        ) from None
    if response.status_code >= 400:
        raise upstream_error(response.status_code, response.content, call)
    return response


def upstream_error(status: int, content: bytes, call: DirectCall) -> GatewayError:
    """What the client gets for an upstream's refusal: its 4xx about the request passed on with
    the upstream's words (cleaned); the gateway's credentials refused, a 502 that says nothing
    of the key; the upstream busy (429) or down, 503 or 502."""
    message = _redacted(_message(content), call)
    log.warning("direct backend %s answered %d: %s", call.url, status, message[:300])
    if status in (401, 403):
        return UpstreamError(
            f"The backend of '{call.gateway_model}' refused the gateway's credentials; "
            "tell its operator.",
            code="upstream_auth_failed",
        )
    if status == 429:
        return ServiceUnavailableError(
            f"The backend of '{call.gateway_model}' is busy. Retry shortly.",
            headers={"Retry-After": "5"},
            code="upstream_busy",
        )
    if status == 503:
        return ServiceUnavailableError(
            f"The backend of '{call.gateway_model}' is unavailable now. Retry later.",
            headers={"Retry-After": "5"},
        )
    if status >= 500 or status in (407, 408):
        return UpstreamError(
            f"The backend of '{call.gateway_model}' failed: {public_message(message)}"
        )
    return backend_error(status, message.replace(call.upstream_model, call.gateway_model))


def _redacted(text: str, call: DirectCall) -> str:
    """`text` without the gateway's key, should the upstream quote it back."""
    key = call.headers.get("authorization", "").removeprefix("Bearer ")
    return text.replace(key, "(key withheld)") if key else text


def _message(content: bytes) -> str:
    try:
        body = json.loads(content)
    except ValueError:
        return content[:500].decode(errors="replace")
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)
        return str(body.get("message") or body.get("detail") or error)
    return str(body)


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        raise UpstreamError("The backend answered something that is not JSON.") from None


def _renamed(body: Any, call: DirectCall) -> Any:
    """The answer with the gateway's model name where the upstream named its own."""
    if call.upstream_model != call.gateway_model and isinstance(body, dict):
        if body.get("model") == call.upstream_model:
            body["model"] = call.gateway_model
        inner = body.get("response") or body.get("message")  # named events' objects
        if isinstance(inner, dict) and inner.get("model") == call.upstream_model:
            inner["model"] = call.gateway_model
    return body


def _usage(body: Any) -> Usage | None:
    try:
        return answer_usage(body)
    except ValidationError:
        log.warning("a direct backend's usage could not be read")
        return None


# ---- the end: one record, one usage record, the reservation settled -----------------------------


class _Ending:
    """How a direct request is written when it ends, once."""

    def __init__(self, submission: Submission, caller: Caller, call: DirectCall) -> None:
        self.submission = submission
        self.caller = caller
        self.call = call
        self.done = False
        # When the upstream's answer first came (a stream's first event), for the usage record.
        self.first_contact: float | None = None

    def _writes(
        self, status: str, usage: Usage | None, error: str | None, response: Any
    ) -> list[tuple[Any, ...]]:
        s = self.submission
        text = None
        if response is not None:
            text = json.dumps(response, separators=(",", ":"), ensure_ascii=False)
            if len(text) > get_settings().inline_result_bytes:
                text = None  # too large for an item: the record keeps the counts only
        record = records.ended(
            s.request_id,
            self.caller,
            s.endpoint,
            self.call.openai_path,
            self.call.stream,
            s.route_reason,
            status=status,
            created_at=self.call.created_at,
            usage=usage,
            error=error,
            response_body=text,
            rate_reservation=self.call.reservation,
        )
        row = usage_module.usage_row(
            user_id=record.user_id,
            username=record.username,
            request_id=record.request_id,
            model=record.model,
            cluster=record.cluster,
            openai_path=record.openai_path,
            stream=self.call.stream,
            status=status,
            usage=usage or Usage(),
            created=self.call.created_at,
            completed=float(record.completed_at),
            first_contact=self.first_contact,
        )
        total = usage.total_tokens if usage else 0
        return [
            (records.save_ended, record),
            (usage_module.save_once, row),
            (ratelimit.settle, self.call.reservation, total),
        ]

    async def write(
        self,
        status: str,
        usage: Usage | None = None,
        error: str | None = None,
        response: Any = None,
    ) -> None:
        """The record and the usage record side by side (each its own item), awaited: the
        answer goes out once they are durable. The reservation's settle (a correction of the
        rate counters, best effort on every path) is not waited for."""
        if self.done:
            return
        self.done = True
        *durable, settle = self._writes(status, usage, error, response)
        results = await asyncio.gather(
            *(asyncio.to_thread(*write) for write in durable), return_exceptions=True
        )
        # After the durable writes, not beside them: they would queue behind it (moto serves
        # one call at a time locally; on DynamoDB it only saves a thread).
        asyncio.get_running_loop().run_in_executor(
            None, _logged, self.submission.request_id, *settle
        )
        for outcome in results:
            if isinstance(outcome, BaseException):
                log.error(
                    "direct request %s not fully written",
                    self.submission.request_id,
                    exc_info=outcome,
                )

    def later(self, status: str, usage: Usage | None = None, error: str | None = None) -> None:
        """The writes, from a task being cancelled (an await there would be cancelled too):
        handed to the default executor, not awaited."""
        if self.done:
            return
        self.done = True
        writes = self._writes(status, usage, error, None)
        loop = asyncio.get_running_loop()
        for write in writes:
            loop.run_in_executor(None, _logged, self.submission.request_id, *write)


def _logged(request_id: str, function: Any, *args: Any) -> None:
    try:
        function(*args)
    except Exception:
        log.exception("direct request %s not fully written", request_id)


# ---- streams ------------------------------------------------------------------------------------


async def _events(response: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    """The upstream's SSE events as (event name, data)."""
    name: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = None, []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            name = line[6:].strip()
    if data:
        yield name, "\n".join(data)


async def _pump(
    response: httpx.Response, into: asyncio.Queue[tuple[str | None, str] | BaseException | None]
) -> None:
    try:
        async for event in _events(response):
            await into.put(event)
        await into.put(None)
    except Exception as error:  # a timeout, a broken connection: the relay says so
        await into.put(error)


async def _relay(
    response: httpx.Response, call: DirectCall, end: _Ending
) -> AsyncGenerator[bytes, None]:
    """The client's SSE body, from the upstream's events as they come; keep-alive comments while
    none comes. A client that leaves (the generator is closed) closes the upstream response,
    so the upstream stops generating for nobody; the request then ends `cancelled`."""
    events: asyncio.Queue[tuple[str | None, str] | BaseException | None] = asyncio.Queue()
    pump = asyncio.ensure_future(_pump(response, events))
    chunks: list[str] = []
    usage: Usage | None = None
    status, error = "cancelled", None
    try:
        while True:
            try:
                item = await asyncio.wait_for(events.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if end.first_contact is None:
                end.first_contact = time.time()
            if item is None:  # the upstream ended without [DONE] or its terminal event
                status = "completed"
                break
            if isinstance(item, BaseException):
                status, failure = _stream_failure(item, call)
                error = str(failure["error"]["message"])
                yield _error_event(failure, call.named)
                break
            name, data = item
            if call.named is None and data == "[DONE]":
                yield b"data: [DONE]\n\n"
                status = "completed"
                break
            event, failed, usage_seen = _client_event(name, data, call)
            if usage_seen is not None:
                usage = usage_seen
            if not failed:
                chunks.append(data)
            if event is not None:
                yield event
            if failed:
                status, error = "failed", _failure_message(data)
                break
            if call.named is not None and name in _TERMINAL_EVENTS:
                status = "completed"
                break
    finally:
        pump.cancel()
        # Not awaited here: in a cancelled task an await would be cancelled too.
        closing = asyncio.ensure_future(response.aclose())
        closing.add_done_callback(_quietly)
        answer = _assembled(call, chunks) if status == "completed" else None
        if call.named is not None and answer is not None:
            usage = _usage(answer)
        if status == "completed":
            await asyncio.shield(end.write(status, usage, error, answer))
        else:
            end.later(status, usage, error)


def _quietly(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _client_event(
    name: str | None, data: str, call: DirectCall
) -> tuple[bytes | None, bool, Usage | None]:
    """One upstream event as the client gets it (None: dropped), whether it is an error, and
    the usage it carries."""
    if call.named is not None:
        parsed = json.loads(data) if '"model"' in data or '"error"' in data else None
        if isinstance(parsed, dict):
            if chunk_error(parsed) is not None:
                return _error_event(_cleaned(parsed), call.named), True, None
            if call.upstream_model != call.gateway_model:
                data = json.dumps(_renamed(parsed, call), separators=(",", ":"))
        prefix = f"event: {name}\n" if name else ""
        return f"{prefix}data: {data}\n\n".encode(), False, None
    try:
        parsed = json.loads(data)
    except ValueError:
        return None, False, None
    if not isinstance(parsed, dict):
        return None, False, None
    if chunk_error(parsed) is not None:
        return _error_event(_cleaned(parsed), None), True, None
    usage = _usage(parsed) if parsed.get("usage") else None
    changed = False
    if call.upstream_model != call.gateway_model and parsed.get("model") == call.upstream_model:
        parsed["model"] = call.gateway_model
        changed = True
    if not call.include_usage:
        # What OpenAI sends a client that did not ask for usage: no usage chunk, no usage key.
        if parsed.get("choices") == [] and parsed.get("usage") is not None:
            return None, False, usage
        if "usage" in parsed and parsed["usage"] is None:
            del parsed["usage"]
            changed = True
    if changed:
        data = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode(), False, usage


def _cleaned(data: dict[str, Any]) -> dict[str, Any]:
    error = dict(data["error"])
    error["message"] = public_message(str(error.get("message") or ""), "The stream failed.")
    return {**data, "error": error}


def _failure_message(data: str) -> str:
    error = chunk_error(data) or {}
    return str(error.get("message") or "The stream failed.")


def _stream_failure(error: BaseException, call: DirectCall) -> tuple[str, dict[str, Any]]:
    if isinstance(error, httpx.TimeoutException):
        timeout = ComputeTimeoutError(
            f"The backend of '{call.gateway_model}' sent nothing for {call.timeout:g} s; "
            "the stream was ended."
        )
        return "timed_out", timeout.to_body()
    log.warning("direct stream from %s broke: %r", call.url, error)
    broken = UpstreamError(f"The backend of '{call.gateway_model}' broke off the stream.")
    return "failed", broken.to_body()


def _error_event(data: dict[str, Any], named: str | None) -> bytes:
    return _event(data, named)  # as the compute path's relay sends it


def _assembled(call: DirectCall, chunks: list[str]) -> Any:
    try:
        return _renamed(assemble.assemble(call.openai_path, chunks), call)
    except (ValueError, TypeError, AttributeError):
        log.warning("a direct stream's answer could not be assembled")
        return None
