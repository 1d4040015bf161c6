"""Design-card paths 1-4: an inference request from the client to the cluster and back.

In the order a request meets them:
- `submit`: validate, route, reserve, record, submit at once or via `queue`;
- `queue`: requests waiting for Globus Compute's API budget, and the submitter that sends them in
  one batch per endpoint;
- `records`: the request record's life (`submitted` until it ends once) and its view;
- `results` and `wait`: a non-streamed answer, written once by its callback, polled for by the
  proxy;
- `stream_sink` and `relay`: a streamed answer's chunk batches, stored by the stream callback
  and relayed to the client as SSE; `assemble`, a finished stream's whole answer;
- `reconciler`: a lost callback costs latency, never an answer;
- `answer`: all of it as the proxy sees it, from the request to the body or events it sends.
"""

from first_core.inference.answer import Answer, answer
from first_core.inference.relay import open_stream, stream_events
from first_core.inference.submit import INFERENCE_PATHS, Submission, submit
from first_core.inference.wait import (
    backend_error,
    forget_task,
    raise_for_result,
    remember_task,
    wait_for_result,
)

__all__ = [
    "INFERENCE_PATHS",
    "Answer",
    "Submission",
    "answer",
    "backend_error",
    "forget_task",
    "open_stream",
    "raise_for_result",
    "remember_task",
    "stream_events",
    "submit",
    "wait_for_result",
]
