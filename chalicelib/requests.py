"""A caller's own requests and usage (first_core.inference, first_core.usage)."""

from __future__ import annotations

from typing import Any

from chalice import Blueprint

from chalicelib.http import caller, query, route
from first_core import usage
from first_core.batches.files import page_params
from first_core.dashboard import history
from first_core.inference import records, results

requests = Blueprint(__name__)


@route(requests, "/v1/requests", methods=["GET"])
def list_requests() -> dict[str, Any]:
    """The caller's requests, newest first (status, model, cluster, latency, tokens), as
    OpenAI's cursor page (`limit`, `after`)."""
    who, params = caller(), query()
    limit, _ = page_params(params, default_limit=20, max_limit=100)
    return history.own_requests(who, limit, params.get("after"))


@route(requests, "/v1/requests/{request_id}", methods=["GET"])
def get_request(request_id: str) -> dict[str, Any]:
    """A request's state and, once completed, its answer (owner only: 404 for anyone else)."""
    return results.request_view(records.get_owned(request_id, caller()))


@route(requests, "/v1/responses/{request_id}", methods=["GET"])
def get_response(request_id: str) -> Any:
    """A Responses API request's stored `response` object, by the FIRST request id the answer's
    `x-first-request-id` header named (owner only; 404 for anyone else, for another route's
    request, or before it completed)."""
    return results.stored_response(records.get_owned(request_id, caller()))


@route(requests, "/v1/usage", methods=["GET"])
def usage_report() -> dict[str, Any]:
    """The caller's own totals by day and model (`?start_date=&end_date=`, default the last 30
    days); an admin may add `?user=<user_id>` or `?user=all`."""
    who = caller()
    params = query()
    return usage.report(who, params.get("user"), params.get("start_date"), params.get("end_date"))
