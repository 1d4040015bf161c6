"""What admins (the `FIRST admins` group) see and do beyond their own data: the activity
figures, everyone's recent requests, and a cluster's maintenance switch (first_core.dashboard).
Everyone else gets 403."""

from __future__ import annotations

import time
from typing import Any

from chalice import Blueprint

from chalicelib.http import caller, query, raw_body, route
from first_core.batches.files import page_params
from first_core.dashboard import activity, history

admin = Blueprint(__name__)
JSON = ["application/json"]


@route(admin, "/v1/admin/activity", methods=["GET"])
def admin_activity() -> dict[str, Any]:
    """Rates, per-model and per-user figures, time series, latencies, outcomes and batches over
    the last `?hours=` (default 24, at most 31 days)."""
    return activity.activity(caller(), query().get("hours"), time.time())


@route(admin, "/v1/admin/requests", methods=["GET"])
def admin_requests() -> dict[str, Any]:
    """Everyone's ended requests of the last `?hours=`, newest first, filtered by `user`,
    `model`, `cluster`, `status`; paged with `limit` and `after`."""
    who, params = caller(), query()
    limit, _ = page_params(params, default_limit=50, max_limit=200)
    return history.request_log(who, params, limit, time.time())


@route(admin, "/v1/admin/clusters/{cluster}/maintenance", methods=["POST"], content_types=JSON)
def admin_maintenance(cluster: str) -> dict[str, Any]:
    """Put a cluster in maintenance (`{"maintenance": true}`) or take it out (false)."""
    return activity.set_cluster_maintenance(caller(), cluster, raw_body())
