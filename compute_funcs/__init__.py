"""Functions that run on the clusters under Globus Compute (no import of the gateway's core).

`FUNCTIONS` names them for registration (`compute_funcs.register`): the names are the keys of
an endpoint's `functions:` in the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compute_funcs.batch import vllm_batch
from compute_funcs.inference import vllm_inference
from compute_funcs.qstat import qstat
from compute_funcs.streaming import vllm_streaming

FUNCTIONS: dict[str, Callable[..., Any]] = {
    "inference": vllm_inference,
    "streaming": vllm_streaming,
    "qstat": qstat,
    "batch": vllm_batch,
}
