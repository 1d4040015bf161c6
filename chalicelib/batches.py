"""Batches: OpenAI's (`/v1/batches`) and FIRST's (a path on the cluster), one namespace of ids
(first_core.batches); owner only."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from chalice import Blueprint, Response

from chalicelib.http import caller, header, query, raw_body, route
from first_core.batches import files, lifecycle, views
from first_core.idempotency import check_key

batch_routes = Blueprint(__name__)
JSON = ["application/json"]


@route(batch_routes, "/v1/batches", methods=["POST"], content_types=JSON)
def create_batch() -> dict[str, Any]:
    """OpenAI's batch create: the caller's batch file, run on its model's batch endpoint."""
    who, body = caller(), raw_body()
    key = check_key(header("idempotency-key"))
    create = partial(lifecycle.create_openai, who, body)
    return views.view(lifecycle.created_once(who, body, key, create))


@route(batch_routes, "/v1/batches", methods=["GET"])
def list_batches() -> dict[str, Any]:
    """The caller's batches, newest first, as OpenAI's cursor page."""
    who = caller()
    params = query()
    limit, _ = files.page_params(params, default_limit=20, max_limit=100)
    return views.list_page(who, limit, params.get("after"))


@route(batch_routes, "/v1/batches/{batch_id}", methods=["GET"])
def get_batch(batch_id: str) -> dict[str, Any]:
    """One of the caller's batches (404 for anyone else's)."""
    return views.view(lifecycle.get_owned(batch_id, caller()))


@route(batch_routes, "/v1/batches/{batch_id}/cancel", methods=["POST"])
def cancel_batch(batch_id: str) -> dict[str, Any]:
    """Cancel one of the caller's batches; it ends `cancelled` once the cluster has stopped."""
    return views.view(lifecycle.cancel(lifecycle.get_owned(batch_id, caller())))


@route(
    batch_routes,
    "/resource_server/v1/{cluster}/{framework}/v1/batches",
    methods=["POST"],
    content_types=JSON,
)
def create_first_batch(cluster: str, framework: str) -> dict[str, Any]:
    """FIRST's batch: `input_file` is a JSONL path on the cluster's file system."""
    who, body = caller(), raw_body()
    key = check_key(header("idempotency-key"))
    create = partial(lifecycle.create_first, who, cluster, framework, body)
    record = lifecycle.created_once(who, body, key, create)
    return views.first_summary(record)


@route(batch_routes, "/resource_server/v1/batches", methods=["GET"])
def list_first_batches() -> list[dict[str, Any]]:
    """FIRST's list of the caller's batches, optionally in one status."""
    return views.first_list(caller(), query().get("status"))


@route(batch_routes, "/resource_server/v1/batches/{batch_id}", methods=["GET"])
def first_batch_status(batch_id: str) -> Response:
    """FIRST answers a batch's status as a bare JSON string (`"running"`)."""
    status = views.first_status(lifecycle.get_owned(batch_id, caller()))
    return Response(json.dumps(status), headers={"Content-Type": "application/json"})


@route(batch_routes, "/resource_server/v1/batches/{batch_id}/result", methods=["GET"])
def first_batch_result(batch_id: str) -> dict[str, Any]:
    """FIRST's result of one of the caller's batches: where its outputs are."""
    return views.first_result(lifecycle.get_owned(batch_id, caller()))
