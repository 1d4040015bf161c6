"""A request's way in: validate, route, reserve, record, submit (at once, or via the submit
queue when Globus Compute's API budget has no unit for it)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from first_core import idempotency, ratelimit, schemas
from first_core.auth import Caller
from first_core.compute import budget, get_backend
from first_core.edge import load_json
from first_core.errors import (
    GatewayError,
    InvalidRequestError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)
from first_core.inference import queue, records, upstream
from first_core.registry import Endpoint, Registry, routing
from first_core.settings import get_settings

INFERENCE_PATHS = ("chat/completions", "completions", "embeddings", "responses", "messages")


@dataclass(frozen=True)
class Submission:
    """An accepted request: its id, its task (None while queued), the endpoint and why it was
    chosen, and the parsed body."""

    request_id: str
    task_id: str | None  # None while it waits in the submit queue
    endpoint: Endpoint
    route_reason: str
    request: schemas.RequestBody
    deadline: float
    # A direct backend's request: the proxy calls the upstream itself (first_core.inference.direct).
    direct: upstream.DirectCall | None = None


# vLLM's (and OpenAI's) own default for /v1/completions, kept when the caller names none.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def max_tokens_ceiling(openai_path: str, endpoint: Endpoint) -> int:
    """The most a generation that names no max_tokens may produce: the endpoint's cap (the
    settings' default where it names none); for text completions, vLLM's default of 16 within
    that cap."""
    cap = endpoint.limits.max_tokens
    if openai_path == "completions":
        return min(cap or COMPLETIONS_DEFAULT_MAX_TOKENS, COMPLETIONS_DEFAULT_MAX_TOKENS)
    return get_settings().default_max_tokens if cap is None else cap


def submit(
    caller: Caller,
    openai_path: str,
    raw_body: bytes,
    cluster: str | None = None,
    framework: str | None = None,
    exclude: frozenset[str] = frozenset(),
    idempotency_key: str | None = None,
    replacing: str | None = None,
) -> Submission:
    """Accept one inference request: check its size and body, route it to an endpoint the caller may
    use, reserve the caller's rate limits, write the request record, and submit it to Globus
    Compute, or put it on the submit queue when the API budget has no unit left. Over a limit
    nothing is recorded; if an endpoint refuses the submit, that attempt ends failed and a federated
    request tries the next endpoint (a named cluster answers 503). With an `idempotency_key`
    the caller used before (first_core.idempotency), nothing new starts: the first request is
    answered again."""
    settings = get_settings()
    if len(raw_body) > settings.max_payload_bytes:
        raise PayloadTooLargeError(
            f"Request body is {len(raw_body)} bytes; the limit is {settings.max_payload_bytes}."
        )
    # Parsed once: the same dict is validated and (with the gateway's max_tokens) sent on.
    payload: Any = load_json(raw_body)  # 400 for bad JSON
    request = schemas.parse_request(openai_path, payload)  # type: ignore[arg-type]
    stream = request.wants_stream()
    route = routing.choose(
        Registry.current(), caller, request.model, cluster, framework, exclude=exclude
    )
    endpoint = route.endpoint
    limit = endpoint.limits.max_tokens
    asked = request.max_output_tokens()
    if limit is not None and asked is not None and asked > limit:
        raise InvalidRequestError(
            f"{request.max_tokens_key} is {asked}; '{endpoint.model}' allows at most {limit}.",
            param=request.max_tokens_key,
            code="invalid_value",
        )

    function_id = endpoint.functions.streaming if stream else endpoint.functions.inference
    if function_id is None and endpoint.direct is None:
        raise InvalidRequestError(
            f"Streaming is not available for '{endpoint.model}' on cluster '{endpoint.cluster}'.",
            param="stream",
        )

    request_id = records.new_request_id()
    # A direct request is answered while its caller waits and leaves no job behind: its
    # record is written once, when it ends, so there is nothing for a repeat to bind to.
    if endpoint.direct is not None:
        idempotency_key = None
    if idempotency_key is not None:
        bound = idempotency.claim(
            caller.user_id, idempotency_key, raw_body, request_id, replacing
        )
        if bound != request_id:  # a repeat: the first request, not a second job
            return resume(caller, bound, request)
    # The rate limits, before anything is written or submitted: over a limit this raises 429
    # with nothing taken and nothing recorded. A generation that names no max_tokens gets one
    # here, so what runs can never exceed the endpoint's cap or the caller's budget.
    fit = asked is None and openai_path != "embeddings"
    try:
        reservation = ratelimit.reserve(
            caller.user_id,
            endpoint,
            ratelimit.prompt_estimate(len(raw_body)),
            max_tokens_ceiling(openai_path, endpoint) if fit else (asked or 0),
            request.sequences(),
            fit=fit,
        )
    except BaseException:
        if idempotency_key is not None:  # refused before it was recorded: a repeat starts anew
            idempotency.release(caller.user_id, idempotency_key, request_id)
        raise
    if endpoint.direct is not None:
        try:
            call = upstream.prepare(endpoint, openai_path, request, raw_body, reservation)
        except BaseException:  # no key to call it with: nothing was sent, nothing is held
            ratelimit.settle(reservation.to_json(), 0)
            raise
        deadline = time.monotonic() + call.timeout
        return Submission(request_id, None, endpoint, route.reason, request, deadline, call)
    assert function_id is not None  # a Globus Compute endpoint's, checked above
    # Globus Compute's API budget (compute/budget.py): a unit now, or the submit queue, whose
    # submitter sends the waiting requests of an endpoint in one batch. (Without a queue, wait
    # a few windows for a unit.)
    queued = False
    try:
        budget.spend(wait=0.0 if settings.submit_queue_url else None)
    except budget.BudgetExhausted:
        if not settings.submit_queue_url:
            ratelimit.settle(reservation.to_json(), 0)
            if idempotency_key is not None:
                idempotency.release(caller.user_id, idempotency_key, request_id)
            raise
        queued = True
    try:
        records.create(
            request_id,
            caller,
            endpoint,
            openai_path,
            stream,
            route.reason,
            rate_reservation=reservation.to_json() if reservation.counters else None,
            queued=queued,
            max_tokens=asked if asked is not None else reservation.max_tokens,
            choices=request.sequences(),
            prompt_bytes=None if request.refers_to_media() else len(raw_body),
        )
    except BaseException:
        ratelimit.settle(reservation.to_json(), 0)
        if idempotency_key is not None:
            idempotency.release(caller.user_id, idempotency_key, request_id)
        raise
    if reservation.max_tokens is not None:
        payload[request.max_tokens_key] = reservation.max_tokens
    if not stream:
        # Nothing streams, so there is nothing to configure; vLLM would refuse the key.
        payload.pop("stream_options", None)
    task_id: str | None = None
    try:
        if queued:
            queue.enqueue(
                queue.QueuedRequest(
                    request_id,
                    endpoint.endpoint_id,
                    function_id,
                    openai_path,
                    stream,
                    payload,
                    fitted_max_tokens=fit,
                )
            )
        else:
            kwargs = queue.task_kwargs(request_id, openai_path, stream, payload, fit)
            # Made before the prepaid call: making it (once per process) spends its own unit,
            # which must not use up the one this request took.
            backend = get_backend()
            with budget.prepaid():
                task_id = backend.submit(endpoint.endpoint_id, function_id, kwargs)
    except ServiceUnavailableError as error:
        # The endpoint went offline since the status was read: a federated request tries the
        # next cluster (this attempt ends failed, with its reservation settled).
        records.finish(request_id, "failed", error=error.message)
        if cluster is not None:
            raise
        return submit(
            caller,
            openai_path,
            raw_body,
            cluster,
            framework,
            exclude | {endpoint.endpoint_id},
            idempotency_key,
            replacing=request_id,  # the key moves to the attempt that goes on
        )
    except GatewayError as error:
        records.finish(request_id, "failed", error=error.message)
        raise
    return Submission(
        request_id,
        task_id,
        endpoint,
        route.reason,
        request,
        time.monotonic() + settings.result_wait_seconds,
    )


def resume(caller: Caller, request_id: str, request: schemas.RequestBody) -> Submission:
    """The request an earlier call with the same Idempotency-Key started, to be answered again
    (its stored answer, or a wait on it)."""
    record = idempotency.first_made(lambda: records.get_owned(request_id, caller))
    endpoint = Registry.current().endpoint(record.cluster, record.framework, record.model)
    if endpoint is None:
        raise ServiceUnavailableError(
            f"The cluster that ran request {request_id} no longer serves '{record.model}'."
        )
    return Submission(
        request_id,
        record.task_id,
        endpoint,
        f"repeat of {request_id} (Idempotency-Key)",
        request,
        time.monotonic() + get_settings().result_wait_seconds,
    )
