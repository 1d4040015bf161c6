"""The moto server of the local stack: moto's own WSGI app, served by waitress.

moto's bundled server is Werkzeug's development server, which closes the connection after
every response, so each DynamoDB call pays a TCP connect and a new thread; waitress keeps
connections alive (10 → 4.6 ms a put). moto's dispatcher also lists its own package directory
on disk for every request; that listing never changes while the server runs, so it is read once.

DynamoDB applies each write's condition and update atomically; moto does not (its
`update_item` reads, checks and writes the item with no lock), so with waitress's threads two
conditional `ADD`s could both pass. DynamoDB requests are therefore served one at a time, as
the rate limits (first_core.ratelimit) rely on DynamoDB doing.

With `--throttle-writes F` (fault injection, `first-gateway dev --throttle-writes F`) a fraction
F of DynamoDB write calls is answered as DynamoDB does when a table is throttled: HTTP 400,
`ProvisionedThroughputExceededException`, which botocore retries with back-off.

    python -m first_local.moto_server --port PORT [--throttle-writes F]
"""

from __future__ import annotations

import argparse
import json
import random
import threading
from collections.abc import Callable, Iterable
from typing import Any

import moto.backends
import waitress
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

_MODULES = tuple(moto.backends.list_of_moto_modules())
moto.backends.list_of_moto_modules = lambda: _MODULES


WRITE_OPERATIONS = frozenset(
    {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"}
)
THROTTLED = json.dumps(
    {
        "__type": "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
        "message": "The level of configured provisioned throughput for the table was exceeded "
        "(injected: --throttle-writes).",
    }
).encode()


class SerializedDynamoDB:
    """moto's app, with DynamoDB calls (the `X-Amz-Target: DynamoDB_...` ones) one at a time."""

    def __init__(self, app: Callable[..., Iterable[bytes]], throttle_writes: float = 0.0) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._throttle_writes = throttle_writes

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if not target.startswith("DynamoDB_"):
            return self._app(environ, start_response)
        operation = target.rpartition(".")[2]
        if (
            self._throttle_writes
            and operation in WRITE_OPERATIONS
            and random.random() < self._throttle_writes
        ):
            start_response(
                "400 Bad Request", [("Content-Type", "application/x-amz-json-1.0")]
            )
            return [THROTTLED]
        with self._lock:
            return list(self._app(environ, start_response))


def main() -> None:
    """Serve moto's AWS stand-in (DynamoDB, S3, SQS) on `--port` until stopped: DynamoDB
    requests one at a time, its writes optionally throttled."""
    parser = argparse.ArgumentParser(prog="first_local.moto_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--throttle-writes", type=float, default=0.0)
    args = parser.parse_args()
    app = DomainDispatcherApplication(create_backend_app)
    waitress.serve(
        SerializedDynamoDB(app, args.throttle_writes),
        host=args.host,
        port=args.port,
        threads=args.threads,
        _quiet=True,
    )


if __name__ == "__main__":
    main()
