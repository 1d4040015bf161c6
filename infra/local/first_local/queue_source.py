"""The submit queue's event source on the local stack: what Lambda's SQS event source mapping
does for the submitter on AWS (template.yaml, `SubmitterQueueMapping`), as a thread.

It long-polls the queue on the moto server, collects what arrives within a short batching
window (up to 100 messages), hands it to the submitter (`first_core.inference.queue`, the same
code `functions.submitter` runs), deletes the messages that were dealt with and leaves the
others to come back after the queue's visibility timeout, as ReportBatchItemFailures does.

`kill` (the stack's `--kill-submitter F`): a fraction of the submitter's batches dies right after
Globus Compute received the batch and before any task id was written, deleting nothing: the
case the claims and the reconciler make safe (no request runs twice, none is lost).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from typing import Any

log = logging.getLogger("first.submitter")

BATCH_SIZE = 100


class SubmitterKilled(BaseException):
    """The submitter died (injected): nothing after this point of its run happens."""


class SubmitQueueSource:
    """The SQS event source mapping of the submitter, as a thread on the local stack."""

    def __init__(self, queue_url: str, window: float = 0.25, kill: float = 0.0) -> None:
        from first_core.inference.queue import sqs

        self.queue_url = queue_url
        self.window = window
        self.kill = kill
        self._sqs = sqs()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="submitter", daemon=True)

    def start(self) -> SubmitQueueSource:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling and wait for the poll in flight (at most a long poll), so that the stack
        stops the moto server only after this thread is done with it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                messages = self._collect()
                if messages:
                    self._invoke(messages)
            except Exception:
                if self._stop.is_set():
                    return  # the stack is stopping: its moto server may already be gone
                log.exception("the submitter failed")
                time.sleep(1.0)

    def _collect(self) -> dict[str, dict[str, Any]]:
        """Messages by id: whatever the first long poll brings, plus what comes in the window."""
        messages: dict[str, dict[str, Any]] = {}
        closes = None
        while len(messages) < BATCH_SIZE and not self._stop.is_set():
            wait = 1 if closes is None else max(0.0, closes - time.monotonic())
            if closes is not None and wait <= 0:
                break
            answer = self._sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=int(wait + 0.999),
            )
            for message in answer.get("Messages", []):
                messages[message["MessageId"]] = message
            if messages and closes is None:
                closes = time.monotonic() + self.window
            if closes is None:
                return messages  # nothing in a whole long poll: look again
        return messages

    def _invoke(self, messages: dict[str, dict[str, Any]]) -> None:
        from first_core.inference.queue import submit_waiting

        def after_send(request_ids: list[str]) -> None:
            if random.random() < self.kill:
                raise SubmitterKilled(f"after sending {len(request_ids)} requests")

        started = time.perf_counter()
        try:
            report = submit_waiting(
                {m: message["Body"] for m, message in messages.items()}, after_send=after_send
            )
        except SubmitterKilled as killed:
            print(f"submitter: killed (injected) {killed}", flush=True)
            return
        retry = set(report.retry)
        done = [m for m in messages.values() if m["MessageId"] not in retry]
        for start in range(0, len(done), 10):
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                for i, m in enumerate(done[start : start + 10])
            ]
            self._sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
        if report.submitted or report.failed or report.retry:
            summary = {k: len(v) for k, v in report.to_json().items() if isinstance(v, list)}
            summary |= {"calls": report.calls, "ms": round((time.perf_counter() - started) * 1e3)}
            print(f"submitter: {json.dumps(summary)}", flush=True)
