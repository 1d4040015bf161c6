"""What runs inside an endpoint's worker processes besides the task itself.

`prepare_worker` is each worker's initializer: the cluster's environment (`VLLM_BASE_URL`,
the batch function's roots, ...) and death with the stand-in. The other functions travel to the
workers as source, exactly like `compute_funcs` (the stand-in serializes them with
`DillCodeSource`), so each must be self-contained: imports inside, no module globals.

The two fault functions replace a task's function in the stand-in (`--fail-compute`,
`--kill-workers`), so `compute_funcs` stay untouched and the failure is a real one: an
exception raised on the endpoint, or a worker process that dies under its task.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def prepare_worker(env: dict[str, str]) -> None:
    os.environ.update(env)
    # End with the stand-in however it ends. (PR_SET_PDEATHSIG would fire when the *thread*
    # that started the worker ends, and engines start workers from short-lived threads.)
    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, name="watch-parent", daemon=True).start()


def warm_up() -> int:
    """A task that only brings up the worker (imports and all), so the first request doesn't."""
    import os

    return os.getpid()


def injected_failure(*args: Any, **kwargs: Any) -> Any:
    """`--fail-compute`: the task raises on the endpoint."""
    raise RuntimeError("injected fault: the compute function raised (--fail-compute)")


def killed_mid_task(function_buffer: str, seconds: float, *args: Any, **kwargs: Any) -> Any:
    """`--kill-workers`: the real function starts, and its worker process is killed under it
    within `seconds` (or as it returns, whichever comes first), as a node lost or an
    out-of-memory kill would do. The task never returns."""
    import os
    import signal
    import threading

    from globus_compute_sdk.serialize import ComputeSerializer

    function = ComputeSerializer().deserialize(function_buffer)
    finished = threading.Event()

    def run() -> None:
        try:
            function(*args, **kwargs)
        finally:
            finished.set()

    threading.Thread(target=run, daemon=True).start()
    finished.wait(seconds)
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: the worker was killed")
