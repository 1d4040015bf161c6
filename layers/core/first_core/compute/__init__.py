"""Running functions on cluster endpoints: Globus Compute behind one interface.

- `base`: the interface (`ComputeBackend`, `TaskState`), whatever runs the tasks;
- `globus`: `GlobusComputeBackend`, through the real `globus-compute-sdk`;
- `budget`: the one budget of Globus Compute API calls that every function draws on;
- here: the process's backend (`get_backend`, `set_backend`) and `background_lookup` for the
  scheduled functions.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from first_core.compute import budget
from first_core.compute.base import ComputeBackend, EndpointStatus, TaskState, TaskStatus
from first_core.compute.globus import (
    SERVICE_URL_VARIABLE,
    GlobusComputeBackend,
    SubmitRefused,
    globus_client,
    traceback_summary,
)
from first_core.errors import ServiceUnavailableError

__all__ = [
    "SERVICE_URL_VARIABLE",
    "ComputeBackend",
    "EndpointStatus",
    "GlobusComputeBackend",
    "SubmitRefused",
    "TaskState",
    "TaskStatus",
    "background_lookup",
    "budget",
    "get_backend",
    "globus_client",
    "set_backend",
    "traceback_summary",
]

log = logging.getLogger("first.compute")
T = TypeVar("T")


def background_lookup(what: Callable[[], T], errors: list[str]) -> T | None:
    """A scheduled function's Globus Compute lookup, at the budget's background priority:
    None when the budget has no unit for it now or Globus Compute failed (logged, and said in
    `errors`); the next scheduled run looks again."""
    with budget.priority(budget.Priority.BACKGROUND):
        try:
            return what()
        except budget.BudgetExhausted:
            return None
        except Exception as error:
            log.exception("Globus Compute lookup failed")
            errors.append(f"task states: {type(error).__name__}: {error}")
            return None


_backend: ComputeBackend | None = None
_backend_lock = threading.Lock()


def set_backend(backend: ComputeBackend | None) -> None:
    """Install the backend this process uses (tests install a scripted one; None: the default)."""
    global _backend
    _backend = backend


def get_backend() -> ComputeBackend:
    """The process's Globus Compute backend, made once; 503 with Retry-After when Globus Compute
    cannot be reached."""
    global _backend
    with _backend_lock:
        if _backend is None:
            try:
                _backend = GlobusComputeBackend()
            except Exception as error:  # no token, service down: nothing can run now
                log.warning("Globus Compute is unreachable: %r", error)
                raise ServiceUnavailableError(
                    "Globus Compute cannot be reached now; retry shortly.",
                    headers={"Retry-After": "30"},
                ) from error
        return _backend
