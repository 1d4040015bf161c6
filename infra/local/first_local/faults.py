"""Fault injection for the local stack's compute path (`first-gateway dev --drop-callbacks ...`).

The compute functions (`compute_funcs`) ship to clusters and stay untouched. Instead the
gateway's public address for callbacks (`FIRST_PUBLIC_BASE_URL`) is a small fault proxy in the
stack process, which forwards each callback to the gateway, or not:

- `drop` (fraction): the callback is lost in transit; the function is told `{"continue": true}`
  as if it had arrived, so it goes on (and returns its result, for the reconciler); of a batch's
  callbacks only the final `done` is ever lost (see `_droppable`);
- `duplicate` (fraction): the callback is delivered twice, the second right after the first;
- `delay` (seconds): every callback is held this long before it is forwarded.

`--fail-compute` and `--kill-workers` are the Compute stand-in's (a task's function raises on
the endpoint, or its worker process is killed under it: first_local.compute_standin), and
`--throttle-writes` makes the moto server refuse a fraction of DynamoDB writes with
`ProvisionedThroughputExceededException` (first_local.moto_server).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("first.faults")


@dataclass(frozen=True)
class CallbackFaults:
    """The fault switches of the callback path: fractions dropped and duplicated, and a delay."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.drop or self.duplicate or self.delay)


class CallbackFaultProxy:
    """An HTTP server on loopback that forwards callbacks to `target` with the faults applied."""

    def __init__(self, target: str, faults: CallbackFaults) -> None:
        self.target = target.rstrip("/")
        self.faults = faults
        self.counts = {"received": 0, "dropped": 0, "duplicated": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                status, reply = proxy.forward(self.path, dict(self.headers), body)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="callback-faults", daemon=True
        )

    def start(self) -> CallbackFaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def forward(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        self.counts["received"] += 1
        if random.random() < self.faults.drop and _droppable(path, body):
            self.counts["dropped"] += 1
            return 200, json.dumps({"continue": True, "accepted": True}).encode()
        if self.faults.delay:
            time.sleep(self.faults.delay)
        status, reply = self._post(path, headers, body)
        if random.random() < self.faults.duplicate:
            self.counts["duplicated"] += 1
            self._post(path, headers, body)
        return status, reply

    def _post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        keep = {
            k: v for k, v in headers.items() if k.lower() in ("authorization", "content-type")
        }
        request = urllib.request.Request(
            self.target + path, data=body, headers=keep, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read()
        except OSError as error:
            log.warning("callback fault proxy could not reach the gateway: %s", error)
            return 502, b'{"error": {"message": "gateway unreachable"}}'


def _droppable(path: str, body: bytes) -> bool:
    """A batch's progress and upload callbacks always go through: their replies carry what the
    function needs (go on or stop, where to upload), which a made-up reply cannot. Its `done`
    callback, the one whose loss the batch driver must make good, may be lost like any other."""
    if not path.endswith("/batch"):
        return True
    try:
        return bool(json.loads(body).get("event") == "done")
    except (ValueError, AttributeError):
        return True
