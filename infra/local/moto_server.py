"""The moto server of the local stack: moto's own WSGI app, served by waitress.

moto's bundled server is Werkzeug's development server, which closes the connection after
every response, so each DynamoDB call pays a TCP connect and a new thread; waitress keeps
connections alive (10 → 4.6 ms a put). moto's dispatcher also lists its own package directory
on disk for every request; that listing never changes while the server runs, so it is read once.

DynamoDB applies each write's condition and update atomically; moto does not (its
`update_item` reads, checks and writes the item with no lock), so with waitress's threads two
conditional `ADD`s could both pass. DynamoDB requests are therefore served one at a time, as
the rate limits (first_core.ratelimit) rely on DynamoDB doing.

    python -m first_local.moto_server --port PORT
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable, Iterable
from typing import Any

import moto.backends
import waitress
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

_MODULES = tuple(moto.backends.list_of_moto_modules())
moto.backends.list_of_moto_modules = lambda: _MODULES


class SerializedDynamoDB:
    """moto's app, with DynamoDB calls (the `X-Amz-Target: DynamoDB_...` ones) one at a time."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if not environ.get("HTTP_X_AMZ_TARGET", "").startswith("DynamoDB_"):
            return self._app(environ, start_response)
        with self._lock:
            return list(self._app(environ, start_response))


def main() -> None:
    parser = argparse.ArgumentParser(prog="first_local.moto_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    app = DomainDispatcherApplication(create_backend_app)
    waitress.serve(
        SerializedDynamoDB(app), host=args.host, port=args.port, threads=args.threads, _quiet=True
    )


if __name__ == "__main__":
    main()
