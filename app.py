"""The control plane: every route that is not inference, as one Chalice app.

Routes parse the request, call `first_core`, and shape the reply; errors are `GatewayError`s
turned into OpenAI-shaped bodies by `api()`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from chalice import Chalice, Rate, Response
from chalice.app import Request

from first_core import observability, usage
from first_core.auth import Caller, get_authenticator
from first_core.errors import GatewayError, InvalidRequestError, internal_error_body
from first_core.inference import results, stream_sink
from first_core.registry import Registry
from first_core.registry.routing import may_use, state

app = Chalice(app_name="first-gateway")
# File uploads arrive as multipart/form-data: bytes, not text (template.yaml lists it too).
app.api.binary_types.append("multipart/form-data")
log = logging.getLogger("first.control")
observability.configure_logging()


def api(path: str, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`app.route` whose view answers every `GatewayError` in OpenAI's error shape, and counts
    callbacks and refusals (first_core.observability)."""
    callback_kind = _callback_kind(path)

    def register(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                answer = view(*args, **kwargs)
            except GatewayError as error:
                if callback_kind:
                    observability.count("Callbacks", Kind=callback_kind, Outcome=error.status)
                else:
                    observability.count("Refused", Status=error.status, Code=error.code)
                return Response(
                    error.to_body(), status_code=error.status, headers=dict(error.headers)
                )
            except Exception:
                log.exception("control-plane route failed", extra={"route": path})
                return Response(internal_error_body(), status_code=500)
            if callback_kind:
                observability.count("Callbacks", Kind=callback_kind, Outcome="accepted")
                elapsed_ms = (time.perf_counter() - started) * 1000
                observability.timing("CallbackMs", elapsed_ms, Kind=callback_kind)
            return answer

        return app.route(path, **options)(guarded)

    return register


def _callback_kind(path: str) -> str | None:
    """`result`, `stream` or `batch` for the callback routes the clusters call; else None."""
    if not path.startswith("/callbacks/"):
        return None
    return {"stream": "stream", "batch": "batch"}.get(path.rsplit("/", 1)[-1], "result")


# Chalice answers a few refusals itself, before any view runs (405 for a method a route does not
# take, 415 for a content type it does not accept), as `{"Code", "Message"}`: put them in OpenAI's
# shape too. API Gateway sends a wrong method nowhere (the template's 404), but not a wrong type.
_CHALICE_ERROR_CODES = {405: "method_not_allowed", 415: "unsupported_media_type"}


@app.middleware("http")
def openai_shaped_chalice_errors(event: Request, get_response: Callable[..., Any]) -> Response:
    response: Response = get_response(event)
    body = response.body
    if response.status_code >= 400 and isinstance(body, dict) and set(body) == {"Code", "Message"}:
        if response.status_code >= 500:
            response.body = internal_error_body()
        else:
            response.body = InvalidRequestError(
                str(body["Message"]), code=_CHALICE_ERROR_CODES.get(response.status_code)
            ).to_body()
    return response


def current_request() -> Request:
    request = app.current_request
    assert request is not None, "only called inside a route"
    return request


def query() -> dict[str, str]:
    return dict(current_request().query_params or {})


def raw_body() -> bytes:
    body = current_request().raw_body
    return body.encode() if isinstance(body, str) else bytes(body or b"")


def caller() -> Caller:
    authenticator = get_authenticator()
    who = authenticator.authenticate(current_request().headers.get("authorization"))
    authenticator.authorize(who)
    return who


@api("/health", methods=["GET"])
def health() -> dict[str, Any]:
    registry = Registry.current()
    return {"status": "ok", "clusters": {c.name: c.status for c in registry.clusters.values()}}


def _models(
    who: Caller, cluster: str | None = None, framework: str | None = None
) -> dict[str, Any]:
    registry = Registry.current()
    served: dict[str, list[str]] = {}
    states: dict[str, dict[str, str]] = {}  # model -> cluster -> state, as last polled
    for endpoint in registry.endpoints:
        if (cluster and endpoint.cluster != cluster) or (
            framework and endpoint.framework != framework
        ):
            continue
        if may_use(who, registry, endpoint):
            served.setdefault(endpoint.model, []).append(endpoint.cluster)
            states.setdefault(endpoint.model, {})[endpoint.cluster] = state(registry, endpoint)
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": 0,
                "owned_by": "first",
                "clusters": clusters,
                "states": states[model],
            }
            for model, clusters in sorted(served.items())
        ],
    }


@api("/v1/models", methods=["GET"])
def list_models() -> dict[str, Any]:
    return _models(caller())


@api("/resource_server/v1/{cluster}/{framework}/v1/models", methods=["GET"])
def list_cluster_models(cluster: str, framework: str) -> dict[str, Any]:
    from first_core.errors import NotFoundError

    who = caller()
    known = Registry.current().clusters.get(cluster)
    if known is None or framework not in known.frameworks:
        raise NotFoundError(f"No framework '{framework}' on cluster '{cluster}'.", param="cluster")
    return _models(who, cluster, framework)


@api("/resource_server/v1/whoami", methods=["GET"])
def whoami() -> dict[str, Any]:
    # Authenticated but not authorized: this is how a refused user learns who the gateway
    # thinks they are and which groups it saw.
    who = get_authenticator().authenticate(current_request().headers.get("authorization"))
    return {
        "user_id": who.user_id,
        "username": who.username,
        "name": who.name,
        "email": who.email,
        "identity_provider": {"domain": who.idp_domain, "name": who.idp_name},
        "groups": sorted(who.groups),
        "is_admin": who.is_admin,
    }


@api("/v1/usage", methods=["GET"])
def usage_report() -> dict[str, Any]:
    """The caller's own totals by day and model (`?start_date=&end_date=`, default the last 30
    days); an admin may add `?user=<user_id>` or `?user=all`."""
    who = caller()
    params: Mapping[str, str] = current_request().query_params or {}
    return usage.report(who, params.get("user"), params.get("start_date"), params.get("end_date"))


@api("/callbacks/{request_id}", methods=["POST"], content_types=["application/json"])
def result_callback(request_id: str) -> dict[str, Any]:
    authorization = current_request().headers.get("authorization")
    return results.accept_callback(request_id, authorization, raw_body())


@api("/callbacks/{request_id}/stream", methods=["POST"], content_types=["application/json"])
def stream_callback(request_id: str) -> dict[str, Any]:
    authorization = current_request().headers.get("authorization")
    return stream_sink.accept_stream_callback(request_id, authorization, raw_body())


@api("/v1/requests/{request_id}", methods=["GET"])
def get_request(request_id: str) -> dict[str, Any]:
    """A request's state and, once completed, its answer (owner only: 404 for anyone else)."""
    from first_core.inference import records

    return results.request_view(records.get_owned(request_id, caller()))


@app.schedule(Rate(1, unit=Rate.MINUTES), name="reconciler")
def reconciler(event: Any) -> dict[str, Any]:
    """Recover requests whose callback was lost (first_core.inference.reconciler)."""
    from first_core.inference.reconciler import reconcile

    report = reconcile().to_json()
    for what in ("completed", "failed", "timed_out"):
        if report[what]:
            observability.count("Recovered", len(report[what]), What=f"request_{what}")
    return report


@app.lambda_function(name="submitter")
def submitter(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Send the requests waiting in the submit queue, one Globus Compute batch per endpoint
    (first_core.inference.queue). Messages to deliver again are reported as batch item failures
    (the queue's event source has ReportBatchItemFailures)."""
    from first_core.inference.queue import submit_waiting

    report = submit_waiting({r["messageId"]: r["body"] for r in event.get("Records", [])})
    if report.submitted:
        observability.count("Submitted", len(report.submitted), What="queued")
    return {"batchItemFailures": [{"itemIdentifier": m} for m in report.retry]}


@api("/resource_server/v1/list-endpoints", methods=["GET"])
def list_endpoints() -> dict[str, Any]:
    """FIRST's list of clusters, frameworks and models the caller may use."""
    from first_core.registry import views

    return views.list_endpoints(Registry.current(), caller())


@api("/resource_server/v1/{cluster}/jobs", methods=["GET"])
def cluster_jobs(cluster: str) -> dict[str, Any]:
    """The cluster's running, starting, queued and stopped models, as last polled."""
    from first_core.registry import views

    return views.jobs(Registry.current(), caller(), cluster)


@api("/resource_server/v1/status", methods=["GET"])
def cluster_status() -> dict[str, Any]:
    """Per cluster status, free nodes and model counts (no auth)."""
    from first_core.registry import views

    return views.status(Registry.current())


@app.schedule(Rate(1, unit=Rate.MINUTES), name="health_poller")
def health_poller(event: Any) -> dict[str, Any]:
    """Endpoint status and qstat into the registry table (first_core.registry.health)."""
    from first_core.registry.health import poll

    return poll().to_json()


# ---- files and batches (first_core.batches) --------------------------------------------------


@api("/v1/files", methods=["POST"], content_types=["multipart/form-data"])
def upload_file() -> dict[str, Any]:
    """OpenAI's file upload: a batch input, checked line by line before it is kept."""
    from first_core.batches import files

    who = caller()
    upload = files.parse_upload(current_request().headers.get("content-type"), raw_body())
    return files.create(who, upload)


@api("/v1/files", methods=["GET"])
def list_files() -> dict[str, Any]:
    from first_core.batches import files

    who = caller()
    params = query()
    limit, order = files.page_params(params, default_limit=10_000, max_limit=10_000)
    return files.list_page(who, params.get("purpose"), limit, params.get("after"), order)


@api("/v1/files/{file_id}", methods=["GET"])
def get_file(file_id: str) -> dict[str, Any]:
    from first_core.batches import files

    return files.view(files.get_owned(file_id, caller()))


@api("/v1/files/{file_id}", methods=["DELETE"])
def delete_file(file_id: str) -> dict[str, Any]:
    from first_core.batches import files

    return files.delete(files.get_owned(file_id, caller()))


@api("/v1/files/{file_id}/content", methods=["GET"])
def file_content(file_id: str) -> Response:
    """The file's bytes, or a redirect to a presigned URL when too large for a response."""
    from first_core.batches import files

    content = files.content(files.get_owned(file_id, caller()))
    if content.redirect_url is not None:
        return Response(b"", status_code=302, headers={"Location": content.redirect_url})
    # As text: Chalice answers a binary type only to a request that Accepts it, and the
    # OpenAI SDK does not; batch files are UTF-8 JSONL (checked on upload, written by us).
    return Response(
        (content.body or b"").decode("utf-8", errors="replace"),
        status_code=200,
        headers={"Content-Type": "application/jsonl; charset=utf-8"},
    )


@api("/v1/batches", methods=["POST"], content_types=["application/json"])
def create_batch() -> dict[str, Any]:
    from first_core.batches import lifecycle
    from first_core.batches import views as batch_views

    return batch_views.view(lifecycle.create_openai(caller(), raw_body()))


@api("/v1/batches", methods=["GET"])
def list_batches() -> dict[str, Any]:
    from first_core.batches import files
    from first_core.batches import views as batch_views

    who = caller()
    params = query()
    limit, _ = files.page_params(params, default_limit=20, max_limit=100)
    return batch_views.list_page(who, limit, params.get("after"))


@api("/v1/batches/{batch_id}", methods=["GET"])
def get_batch(batch_id: str) -> dict[str, Any]:
    from first_core.batches import lifecycle
    from first_core.batches import views as batch_views

    return batch_views.view(lifecycle.get_owned(batch_id, caller()))


@api("/v1/batches/{batch_id}/cancel", methods=["POST"])
def cancel_batch(batch_id: str) -> dict[str, Any]:
    from first_core.batches import lifecycle
    from first_core.batches import views as batch_views

    return batch_views.view(lifecycle.cancel(lifecycle.get_owned(batch_id, caller())))


@api(
    "/resource_server/v1/{cluster}/{framework}/v1/batches",
    methods=["POST"],
    content_types=["application/json"],
)
def create_first_batch(cluster: str, framework: str) -> dict[str, Any]:
    """FIRST's batch: `input_file` is a JSONL path on the cluster's file system."""
    from first_core.batches import lifecycle
    from first_core.batches import views as batch_views

    record = lifecycle.create_first(caller(), cluster, framework, raw_body())
    return batch_views.first_summary(record)


@api("/resource_server/v1/batches", methods=["GET"])
def list_first_batches() -> list[dict[str, Any]]:
    from first_core.batches import views as batch_views

    return batch_views.first_list(caller(), query().get("status"))


@api("/resource_server/v1/batches/{batch_id}", methods=["GET"])
def first_batch_status(batch_id: str) -> Response:
    """FIRST answers a batch's status as a bare JSON string (`"running"`)."""
    import json

    from first_core.batches import lifecycle
    from first_core.batches import views as batch_views

    status = batch_views.first_status(lifecycle.get_owned(batch_id, caller()))
    return Response(json.dumps(status), headers={"Content-Type": "application/json"})


@api("/resource_server/v1/batches/{batch_id}/result", methods=["GET"])
def first_batch_result(batch_id: str) -> dict[str, Any]:
    from first_core.batches import lifecycle
    from first_core.batches import views as batch_views

    return batch_views.first_result(lifecycle.get_owned(batch_id, caller()))


# The variable is named as in the request callbacks' paths: API Gateway allows one variable
# name per level under /callbacks. Here it holds a batch id.
@api("/callbacks/{request_id}/batch", methods=["POST"], content_types=["application/json"])
def batch_callback(request_id: str) -> dict[str, Any]:
    from first_core.batches import callbacks as batch_callbacks

    authorization = current_request().headers.get("authorization")
    return batch_callbacks.accept_callback(request_id, authorization, raw_body())


@app.schedule(Rate(1, unit=Rate.MINUTES), name="batch_driver")
def batch_driver(event: Any) -> dict[str, Any]:
    """Finish batches whose done callback was lost and restart those whose task died
    (first_core.batches.driver)."""
    from first_core.batches.driver import drive

    report = drive().to_json()
    for what in ("finalized", "resubmitted", "ended"):
        if report[what]:
            observability.count("Recovered", len(report[what]), What=f"batch_{what}")
    return report
