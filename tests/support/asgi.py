"""Serve an ASGI app with uvicorn on a free loopback port in a background thread, for tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn


@contextlib.contextmanager
def serve(app: Any, **config: Any) -> Iterator[str]:
    """Yield the app's base URL while it serves; `config` goes to `uvicorn.Config`."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # binding here, not in uvicorn, avoids a free-port race
    port = sock.getsockname()[1]
    options = {"log_level": "warning", "lifespan": "off", "timeout_graceful_shutdown": 2}
    server = uvicorn.Server(uvicorn.Config(app, **{**options, **config}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
