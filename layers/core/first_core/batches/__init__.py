"""Design-card path 6: batches, OpenAI's (an uploaded input file) and FIRST's (a path on the
cluster), one life.

    create ─► in_progress ─► finalizing ─► completed
       │          │  (cancel) ─► cancelling ─► cancelled
       │          └─ past the completion window ─► expired;  attempts used up ─► failed
       └─ the file does not fit the batch (endpoint, one model) ─► failed

In the order a batch meets them:
- `files`: OpenAI's Files (upload, every line checked as its route would check it);
- `lifecycle`: create, submit, cancel, end (and the user's concurrent-batch slots);
- `callbacks`: what the cluster reports (progress, upload, done) and the finalization;
- `driver`: the scheduled recovery of lost reports and dead tasks;
- `views`: OpenAI's and FIRST's shapes of a batch.
"""
