"""The moto server of the local stack: moto's own WSGI app, served by waitress.

moto's bundled server is Werkzeug's development server, which closes the connection after
every response, so each DynamoDB call pays a TCP connect and a new thread; waitress keeps
connections alive (10 → 4.6 ms a put). moto's dispatcher also lists its own package directory
on disk for every request; that listing never changes while the server runs, so it is read once.

    python -m first_local.moto_server --port PORT
"""

from __future__ import annotations

import argparse

import moto.backends
import waitress
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

_MODULES = tuple(moto.backends.list_of_moto_modules())
moto.backends.list_of_moto_modules = lambda: _MODULES


def main() -> None:
    parser = argparse.ArgumentParser(prog="first_local.moto_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    app = DomainDispatcherApplication(create_backend_app)
    waitress.serve(app, host=args.host, port=args.port, threads=args.threads, _quiet=True)


if __name__ == "__main__":
    main()
