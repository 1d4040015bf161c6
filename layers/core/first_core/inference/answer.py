"""An inference request from submission to the answer the proxy sends: a JSON body, or a
stream's SSE events, with the headers every answer carries.

`x-first-request-id`, `x-first-cluster` and `x-first-route-reason` go on every answer and on
every error raised once the request was accepted (so a client that gets a 504 can come back
for the request); a non-streamed answer also says where the gateway's time went
(`server-timing`: auth, submit, wait).

A client that disconnects before its answer (the proxy then cancels the task awaiting
`answer`) is a `cancelled` request, as a stream's client that leaves is (stream_sink.cancel):
the compute function's answer, if it comes, finds the request ended and is billed only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from first_core.auth import Caller
from first_core.errors import GatewayError
from first_core.inference import direct
from first_core.inference.relay import open_stream
from first_core.inference.stream_sink import cancel
from first_core.inference.submit import Submission, submit
from first_core.inference.wait import raise_for_result, wait_for_result

log = logging.getLogger("first.inference")


@dataclass
class Answer:
    """What the proxy sends: its headers, and a JSON body or a stream of SSE events."""

    headers: dict[str, str]
    body: Any = None  # the JSON answer of a non-streamed request
    events: AsyncGenerator[bytes, None] | None = None  # the SSE body of a stream


def request_headers(submission: Submission) -> dict[str, str]:
    """The `x-first-*` headers that identify an accepted request on every answer."""
    return {
        "x-first-request-id": submission.request_id,
        "x-first-cluster": submission.endpoint.cluster,
        "x-first-route-reason": submission.route_reason,
    }


async def answer(
    caller: Caller,
    openai_path: str,
    raw_body: bytes,
    cluster: str | None = None,
    framework: str | None = None,
    auth_ms: float = 0.0,
    idempotency_key: str | None = None,
) -> Answer:
    """Submit the request (on a worker thread: it makes blocking calls) and wait for its
    answer; `auth_ms`, the time the caller's authentication took, for `server-timing`; with an
    `idempotency_key` used before, the request it started is answered again."""
    started = time.perf_counter()
    submitting = asyncio.ensure_future(
        asyncio.to_thread(
            submit,
            caller,
            openai_path,
            raw_body,
            cluster,
            framework,
            idempotency_key=idempotency_key,
        )
    )
    try:
        # Shielded: the submit runs on (a thread cannot be stopped), and is cancelled once done.
        submission = await asyncio.shield(submitting)
    except asyncio.CancelledError:
        submitting.add_done_callback(_cancel_once_submitted)
        raise
    submitted = time.perf_counter()
    headers = request_headers(submission)
    try:
        if submission.direct is not None:  # the proxy calls the upstream itself
            body, events = await direct.answer(submission, caller, headers)
            if events is None:
                headers["server-timing"] = (
                    f"auth;dur={auth_ms:.1f}, submit;dur={(submitted - started) * 1000:.1f}, "
                    + headers["server-timing"]
                )
            return Answer(headers, body=body, events=events)
        if submission.request.wants_stream():
            events = await open_stream(submission)
            # Proxies must pass each event on at once, not buffer the stream.
            streaming = {"cache-control": "no-store", "x-accel-buffering": "no"}
            return Answer({**headers, **streaming}, events=events)
        body = raise_for_result(await wait_for_result(submission))
    except GatewayError as error:
        error.headers.update(headers)
        raise
    except asyncio.CancelledError:
        if submission.direct is None:  # a direct request ends itself
            client_left(submission.request_id)
        raise
    headers["server-timing"] = (
        f"auth;dur={auth_ms:.1f}, submit;dur={(submitted - started) * 1000:.1f}, "
        f"wait;dur={(time.perf_counter() - submitted) * 1000:.1f}"
    )
    return Answer(headers, body=body)


def client_left(request_id: str) -> None:
    """The client disconnected before its answer: the request ends `cancelled` (once; a no-op
    if it ended meanwhile). Synchronous: it runs in a task being cancelled."""
    if cancel(request_id):
        log.info("client disconnected: request cancelled", extra={"request_id": request_id})


def _cancel_once_submitted(submitting: asyncio.Future[Submission]) -> None:
    if not submitting.cancelled() and submitting.exception() is None:
        submission = submitting.result()
        if submission.direct is not None:  # nothing was sent upstream: only give back its hold
            direct.never_sent(submission)
            return
        client_left(submission.request_id)
