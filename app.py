"""The control plane: every route that is not inference, as one Chalice app.

This file is its table of contents: the routes live in `chalicelib/`, one blueprint per room,
each view parsing the request, making one call into `first_core` and shaping the reply
(`chalicelib.http.route` answers every `GatewayError` in OpenAI's error shape). The scheduled
and queue-fed functions are plain Lambda handlers in `functions/`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chalice import Chalice, Response
from chalice.app import Request

from chalicelib.admin import admin
from chalicelib.batches import batch_routes
from chalicelib.callbacks import callbacks
from chalicelib.catalog import catalog
from chalicelib.dashboard import dashboard
from chalicelib.files import file_routes
from chalicelib.requests import requests
from first_core import edge, observability
from first_core.errors import GatewayError, InvalidRequestError, internal_error_body

app = Chalice(app_name="first-gateway")
# File uploads arrive as multipart/form-data: bytes, not text (template.yaml lists it too).
app.api.binary_types.append("multipart/form-data")
observability.configure_logging()

app.register_blueprint(catalog)  # health, models, whoami, list-endpoints, jobs, status
app.register_blueprint(requests)  # a caller's requests and usage
app.register_blueprint(callbacks)  # the callback sink: results, stream chunks, batch reports
app.register_blueprint(file_routes)  # OpenAI Files
app.register_blueprint(batch_routes)  # OpenAI's and FIRST's batches
app.register_blueprint(dashboard)  # the dashboard's page, sign-in and session
app.register_blueprint(admin)  # admins' figures, request log and maintenance switch

# Chalice answers a few refusals itself, before any view runs (405 for a method a route does not
# take, 415 for a content type it does not accept), as `{"Code", "Message"}`: put them in OpenAI's
# shape too. API Gateway sends a wrong method nowhere (the template's 404), but not a wrong type.
_CHALICE_ERROR_CODES = {405: "method_not_allowed", 415: "unsupported_media_type"}


@app.middleware("http")
def openai_shaped_chalice_errors(event: Request, get_response: Callable[..., Any]) -> Response:
    """Chalice's own errors (405, 415, 500) in OpenAI's error shape, as every other refusal."""
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


@app.middleware("http")
def edge_guard(event: Request, get_response: Callable[..., Any]) -> Response:
    """A header that is not UTF-8 text is a 400 before any view reads it (as in the proxy,
    `first_core.edge`), and every answer carries `edge.SECURITY_HEADERS`: `nosniff` and
    `no-store` on every authenticated answer, and on the few open routes too (harmless)."""
    try:
        edge.check_headers((event.headers or {}).items())
    except GatewayError as error:
        observability.count("Refused", Status=error.status, Code=error.code)
        response = Response(error.to_body(), status_code=error.status)
    else:
        response = get_response(event)
    response.headers = {**(response.headers or {}), **edge.SECURITY_HEADERS}
    return response
