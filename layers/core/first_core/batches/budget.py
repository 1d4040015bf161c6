"""A batch's tokens come from its owner's budget as it runs: the same tokens-per-minute counters
an interactive request on the model takes (first_core.ratelimit), so a batch cannot overrun them.

Before each group of lines, the cluster's batch function asks (`tokens` event on the batch
callback) for what the lines may use at most: their prompts' estimates plus their `max_tokens`
(which the function fills in from the endpoint's cap where a line names none). The answer is

- `granted`: taken from the counters of this minute; the function runs the lines, and with its
  next ask says what they `used`, which settles the grant as a request's reservation is settled;
- `retry_in`: the minute has not that much left; the function waits and asks again (the batch
  shows `waiting_for_tokens_at`), rather than overrunning the budget;
- `limit` alone: more than a whole minute allows; the function asks for fewer lines (a single line
  that can never fit fails with `request_too_large`, as the same request would interactively).

One grant is open at a time per batch, kept on its record: a settle names no counter and no
amount the gateway did not grant itself, and a repeated settle changes nothing.
"""

from __future__ import annotations

import time
from typing import Any

from first_core import ratelimit
from first_core.registry import Endpoint, FunctionIds, Limits, Registry
from first_core.schemas.wire import BatchEvent
from first_core.settings import get_settings
from first_core.tables import BatchRecord, update_if


def tokens(record: BatchRecord, event: BatchEvent, still_running: Any) -> dict[str, Any]:
    """Settle the last grant with what its lines used, then grant `event.want` tokens or say
    when to ask again. `still_running`: the condition under which the batch may take more."""
    if event.used is not None:
        settle(record, event.used)
    if record.status not in ("validating", "in_progress"):  # cancelling: stop, granted nothing
        return {"continue": False}
    if event.want <= 0:
        return {"continue": True, "granted": 0}
    now = time.time()
    counters = ratelimit.token_counters_for(record.user_id, _endpoint(record), now)
    if not counters:
        return {"continue": True, "granted": event.want, "limit": None}
    limit = min(c.limit for c in counters)
    if event.want > limit:
        return {"continue": True, "granted": 0, "limit": limit}
    refused = ratelimit.take_tokens(counters, event.want)
    if refused is not None:
        if record.waiting_for_tokens_at is None:
            update_if(record, [BatchRecord.waiting_for_tokens_at.set(now)], still_running)
        wait = ratelimit.retry_after(refused.window_end, now=now)
        return {"continue": True, "granted": 0, "limit": limit, "retry_in": wait}
    grant = ratelimit.Reservation(event.want, counters).to_json()
    granted = [
        BatchRecord.token_grant.set(grant),
        BatchRecord.tokens_granted.add(event.want),
        BatchRecord.waiting_for_tokens_at.remove(),
    ]
    if not update_if(record, granted, still_running):
        ratelimit.settle(grant, 0)  # the batch ended meanwhile: nothing runs on this grant
        return {"continue": False}
    return {"continue": True, "granted": event.want, "limit": limit}


def settle(record: BatchRecord, used: int) -> None:
    """The open grant's lines used `used` tokens: give back the rest (or take the excess) on the
    grant's own counters, once."""
    grant = record.token_grant
    if not grant:
        return
    if update_if(record, [BatchRecord.token_grant.remove()], BatchRecord.token_grant == grant):
        ratelimit.settle(grant, used)


def line_max_tokens(record: BatchRecord) -> int:
    """What a line that names no max_tokens is sent (the function keeps vLLM's 16 for text
    completions within it): the endpoint's cap, or the settings' default where it names none."""
    cap = _endpoint(record).limits.max_tokens
    return get_settings().default_max_tokens if cap is None else cap


def _endpoint(record: BatchRecord) -> Endpoint:
    """The registry's endpoint the batch was routed to, for its limits (the settings' defaults
    when it has left the registry since)."""
    endpoint = Registry.current().endpoint(record.cluster, record.framework, record.model)
    if endpoint is not None:
        return endpoint
    return Endpoint(
        cluster=record.cluster,
        framework=record.framework,
        model=record.model,
        endpoint_id=record.endpoint_id,
        functions=FunctionIds(inference=record.function_id),
        limits=Limits(),
        allowed_groups=[],
        status="offline",
    )
