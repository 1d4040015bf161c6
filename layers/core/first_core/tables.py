"""Every DynamoDB table the gateway uses, as pynamodb models; the one table module.

Table names are `{table_prefix}{name}`; `Meta.host` points at a moto server locally and is unset
on AWS. Expired rows are filtered on read as well, because DynamoDB deletes them lazily (and moto
never does).

Long because: it is the one table module, every model beside the others, so keys, indexes and
TTLs are read in one place (tests/infra checks each model against template.yaml), with the few
helpers every writer shares (`owned_item`, `put_once`, `update_if`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TypeVar

from pynamodb.attributes import (
    BooleanAttribute,
    JSONAttribute,
    NumberAttribute,
    TTLAttribute,
    UnicodeAttribute,
)
from pynamodb.connection import Connection
from pynamodb.exceptions import PutError, UpdateError
from pynamodb.indexes import AllProjection, GlobalSecondaryIndex
from pynamodb.models import Model

from first_core.settings import get_settings

_settings = get_settings()


class _Meta:
    region = _settings.aws_region
    host = _settings.aws_endpoint_url
    billing_mode = "PAY_PER_REQUEST"
    # Requests to a moto server on loopback fail fast; on AWS the defaults of botocore hold.
    max_retry_attempts = 5


def _meta(name: str) -> Any:
    return type("Meta", (_Meta,), {"table_name": f"{_settings.table_prefix}{name}"})


# Terminal states: a request ends in exactly one of them.
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "timed_out"})


class RequestsByUser(GlobalSecondaryIndex["RequestRecord"]):
    """A user's requests by creation time (the index behind their list)."""

    class Meta:
        index_name = "by_user"
        projection = AllProjection()

    user_id = UnicodeAttribute(hash_key=True)
    created_at = NumberAttribute(range_key=True)


class RequestsByStatus(GlobalSecondaryIndex["RequestRecord"]):
    """Open requests only (the attribute is removed at the end), for the reconciler."""

    class Meta:
        index_name = "by_open_status"
        projection = AllProjection()

    open_status = UnicodeAttribute(hash_key=True)
    created_at = NumberAttribute(range_key=True)


class RequestRecord(Model):
    """One inference request: who asked, where it runs, and how it ended."""

    Meta = _meta("requests")

    request_id = UnicodeAttribute(hash_key=True)
    user_id = UnicodeAttribute()  # the Globus identity id (sub) of the owner
    username = UnicodeAttribute()
    model = UnicodeAttribute()
    cluster = UnicodeAttribute()
    framework = UnicodeAttribute()
    endpoint_id = UnicodeAttribute()
    openai_path = UnicodeAttribute()  # chat/completions, completions, embeddings
    stream = BooleanAttribute(default=False)
    status = UnicodeAttribute()  # submitted, running, completed, failed, cancelled, timed_out
    open_status = UnicodeAttribute(null=True)
    route_reason = UnicodeAttribute(null=True)
    task_id = UnicodeAttribute(null=True)
    # Set when the API budget sent the request to the submit queue (first_core.inference.queue);
    # `batch_id` and `claimed_at` when a submitter claimed it for the Globus Compute batch of
    # that id (its task group), so no other submitter sends it again.
    queued_at = NumberAttribute(null=True)
    batch_id = UnicodeAttribute(null=True)
    claimed_at = NumberAttribute(null=True)
    error = UnicodeAttribute(null=True)
    created_at = NumberAttribute()
    updated_at = NumberAttribute()
    completed_at = NumberAttribute(null=True)
    prompt_tokens = NumberAttribute(null=True)
    completion_tokens = NumberAttribute(null=True)
    total_tokens = NumberAttribute(null=True)
    # The rate-limit tokens reserved before submitting (first_core.ratelimit), settled at the end.
    rate_reservation = JSONAttribute(null=True)
    # A streamed request whose done batch (this seq) came while an earlier batch was missing:
    # it ends when the gap is filled, by the late batch or by the reconciler
    # (first_core.inference.stream_sink).
    stream_done_seq = NumberAttribute(null=True)
    # What was sent to the backend, written with the record, so a callback's counts can be
    # checked against what the backend could have produced (first_core.callbacks): the
    # max_tokens per choice (None: no bound known), the number of choices, the body's bytes.
    max_tokens = NumberAttribute(null=True)
    choices = NumberAttribute(null=True)
    prompt_bytes = NumberAttribute(null=True)
    # The answer of a non-streamed request, JSON, written by the update that ends the record
    # (first_core.inference.results; a direct backend's, by its one put): what the waiting proxy
    # polls for and `GET /v1/requests/{id}` shows as `response`. `response_status` is the HTTP
    # status the backend answered with; an answer over `inline_result_bytes` is in the results
    # bucket under `response_s3_key` instead of `response_body` (the item stays under 400 KB).
    response_body = UnicodeAttribute(null=True)
    response_status = NumberAttribute(null=True)
    response_s3_key = UnicodeAttribute(null=True)

    by_user = RequestsByUser()
    by_open_status = RequestsByStatus()


class ResultRecord(Model):
    """The answer of one request, as it was kept before answers moved onto the request record
    (`RequestRecord.response_body`). Nothing writes or reads it now; the table stays declared
    until a release that drops it (its rows expire on their own)."""

    Meta = _meta("results")

    request_id = UnicodeAttribute(hash_key=True)
    status_code = NumberAttribute()
    body = UnicodeAttribute(null=True)  # the JSON body, when it fits in an item
    s3_key = UnicodeAttribute(null=True)  # else where the body is in the results bucket
    created_at = NumberAttribute()
    expires_at = TTLAttribute()


class StreamChunkBatch(Model):
    """One numbered batch of a streamed answer, as the streaming compute function posted it."""

    Meta = _meta("stream_chunks")

    request_id = UnicodeAttribute(hash_key=True)
    seq = NumberAttribute(range_key=True)  # 0, 1, 2, ... per request, no gaps
    chunks = JSONAttribute()  # list of SSE `data:` payloads (JSON strings), in order
    done = BooleanAttribute(default=False)  # the last batch of the stream
    usage = JSONAttribute(null=True)  # on the done batch: the stream's usage, to end it later
    created_at = NumberAttribute()
    expires_at = TTLAttribute()


class TokenCacheEntry(Model):
    """An introspection verdict, keyed by the SHA-256 of the token (never the token)."""

    Meta = _meta("token_cache")

    token_hash = UnicodeAttribute(hash_key=True)
    verdict = JSONAttribute()
    expires_at = TTLAttribute()


class RegistryEntry(Model):
    """A cluster (`key == "#cluster"`) or one of its endpoints (`key == "framework#model"`)."""

    Meta = _meta("registry")

    cluster = UnicodeAttribute(hash_key=True)
    key = UnicodeAttribute(range_key=True)
    config = JSONAttribute()
    status = UnicodeAttribute(default="online")
    updated_at = NumberAttribute(default=0)
    # Cluster rows: free nodes the health poller last saw (None: unknown).
    free_nodes = NumberAttribute(null=True)


class RateCounter(Model):
    """One rate-limit window's counter (first_core.ratelimit): `rps#{user}#{model}#{second}`..."""

    Meta = _meta("rate_counters")

    key = UnicodeAttribute(hash_key=True)
    used = NumberAttribute(null=True)  # taken with conditional ADDs; never read-modify-written
    expires_at = TTLAttribute()


class IdempotencyKey(Model):
    """A caller's `Idempotency-Key`, bound to the request it started (first_core.idempotency):
    `{user_id}#{sha256 of the key}`, never the key itself."""

    Meta = _meta("idempotency_keys")

    key = UnicodeAttribute(hash_key=True)
    request_id = UnicodeAttribute()
    body_hash = UnicodeAttribute()  # the same key with another body is refused
    expires_at = TTLAttribute()


class UsageByDate(GlobalSecondaryIndex["UsageRecord"]):
    """Everyone's usage of one day, for admins (`GET /v1/usage?user=all`)."""

    class Meta:
        index_name = "by_date"
        projection = AllProjection()

    date = UnicodeAttribute(hash_key=True)
    sk = UnicodeAttribute(range_key=True)


class UsageRecord(Model):
    """What one request used, written once when it ends (first_core.usage).

    `sk` is `{created_at, ISO 8601 UTC}#{request_id}`: made only of what the request record
    fixes at creation, so every attempt to write it names the same item, and a user's days are
    one key-range query.
    """

    Meta = _meta("usage")

    user_id = UnicodeAttribute(hash_key=True)
    sk = UnicodeAttribute(range_key=True)
    date = UnicodeAttribute()  # YYYY-MM-DD (UTC) of created_at
    request_id = UnicodeAttribute()
    username = UnicodeAttribute()
    model = UnicodeAttribute()
    cluster = UnicodeAttribute()
    openai_path = UnicodeAttribute()
    stream = BooleanAttribute(default=False)
    status = UnicodeAttribute()
    prompt_tokens = NumberAttribute(default=0)
    completion_tokens = NumberAttribute(default=0)
    total_tokens = NumberAttribute(default=0)
    created_at = NumberAttribute()
    completed_at = NumberAttribute()
    queued_ms = NumberAttribute(null=True)
    first_token_ms = NumberAttribute(null=True)
    total_ms = NumberAttribute()
    expires_at = TTLAttribute()

    by_date = UsageByDate()


class FilesByUser(GlobalSecondaryIndex["FileRecord"]):
    """A user's files by creation time (the index behind their list)."""

    class Meta:
        index_name = "by_user"
        projection = AllProjection()

    user_id = UnicodeAttribute(hash_key=True)
    created_at = NumberAttribute(range_key=True)


class FileRecord(Model):
    """An OpenAI file (first_core.batches.files): an uploaded batch input or a batch's output or
    errors; the bytes are in the results bucket under `s3_key`."""

    Meta = _meta("files")

    file_id = UnicodeAttribute(hash_key=True)
    user_id = UnicodeAttribute()  # the owner; nobody else sees it
    filename = UnicodeAttribute()
    purpose = UnicodeAttribute()  # batch, batch_output
    bytes = NumberAttribute()
    s3_key = UnicodeAttribute()
    created_at = NumberAttribute()
    # Upload checks, so a batch need not read the file again: its lines, models and urls.
    line_count = NumberAttribute(default=0)
    models = JSONAttribute(null=True)
    urls = JSONAttribute(null=True)
    # The largest max_tokens (or max_completion_tokens) a line asks for, and that line's number,
    # so a batch can be refused for an endpoint's limit without reading the file again.
    max_tokens = NumberAttribute(null=True)
    max_tokens_line = NumberAttribute(null=True)
    expires_at = TTLAttribute(null=True)

    by_user = FilesByUser()


class BatchesByUser(GlobalSecondaryIndex["BatchRecord"]):
    """A user's batches by creation time (the index behind their list)."""

    class Meta:
        index_name = "by_user"
        projection = AllProjection()

    user_id = UnicodeAttribute(hash_key=True)
    created_at = NumberAttribute(range_key=True)


class BatchesByStatus(GlobalSecondaryIndex["BatchRecord"]):
    """Open batches only (the attribute is removed at the end), for the batch driver."""

    class Meta:
        index_name = "by_open_status"
        projection = AllProjection()

    open_status = UnicodeAttribute(hash_key=True)
    created_at = NumberAttribute(range_key=True)


class BatchRecord(Model):
    """One batch (first_core.batches): OpenAI's (an input file id) or FIRST's (a path on the
    cluster), its state in OpenAI's words, its progress, attempts and outputs."""

    Meta = _meta("batches")

    batch_id = UnicodeAttribute(hash_key=True)
    user_id = UnicodeAttribute()
    username = UnicodeAttribute()
    kind = UnicodeAttribute()  # "openai" or "first"
    status = UnicodeAttribute()  # validating, in_progress, finalizing, completed, failed, ...
    open_status = UnicodeAttribute(null=True)
    endpoint = UnicodeAttribute()  # /v1/chat/completions, /v1/completions, /v1/embeddings
    model = UnicodeAttribute()
    cluster = UnicodeAttribute()
    framework = UnicodeAttribute()
    endpoint_id = UnicodeAttribute()  # the compute endpoint the batch runs on
    function_id = UnicodeAttribute()
    completion_window = UnicodeAttribute(default="24h")
    metadata = JSONAttribute(null=True)
    input_file_id = UnicodeAttribute(null=True)  # openai
    input_path = UnicodeAttribute(null=True)  # first: on the cluster's file system
    output_folder_path = UnicodeAttribute(null=True)  # first
    output_file_id = UnicodeAttribute(null=True)
    error_file_id = UnicodeAttribute(null=True)
    output_path = UnicodeAttribute(null=True)  # first: where the cluster wrote the results
    error_path = UnicodeAttribute(null=True)
    errors = JSONAttribute(null=True)  # OpenAI's errors.data list
    total = NumberAttribute(default=0)
    completed = NumberAttribute(default=0)
    failed = NumberAttribute(default=0)
    resumed_lines = NumberAttribute(default=0)
    task_id = UnicodeAttribute(null=True)
    attempt = NumberAttribute(default=1)
    prompt_tokens = NumberAttribute(default=0)
    completion_tokens = NumberAttribute(default=0)
    total_tokens = NumberAttribute(default=0)
    # The owner's token budget as the batch runs (first_core.batches.budget): every token taken
    # from it, the grant its running lines hold now, since when it waits for the next one.
    tokens_granted = NumberAttribute(default=0)
    token_grant = JSONAttribute(null=True)
    waiting_for_tokens_at = NumberAttribute(null=True)
    created_at = NumberAttribute()
    updated_at = NumberAttribute()
    expires_at = NumberAttribute()  # created_at + completion window (not a TTL)
    in_progress_at = NumberAttribute(null=True)
    finalizing_at = NumberAttribute(null=True)
    completed_at = NumberAttribute(null=True)
    failed_at = NumberAttribute(null=True)
    expired_at = NumberAttribute(null=True)
    cancelling_at = NumberAttribute(null=True)
    cancelled_at = NumberAttribute(null=True)

    by_user = BatchesByUser()
    by_open_status = BatchesByStatus()


# Every table; template.yaml declares each one (tests/infra checks them key for key), and the
# local stack and the tests create them from there (first_local.provision).
ALL_MODELS: tuple[type[Model], ...] = (
    RequestRecord,
    ResultRecord,
    StreamChunkBatch,
    TokenCacheEntry,
    RegistryEntry,
    RateCounter,
    IdempotencyKey,
    UsageRecord,
    FileRecord,
    BatchRecord,
)


def not_expired(expires_at: Any) -> bool:
    """Whether a row with a TTL is still live (DynamoDB deletes expired rows late)."""
    if expires_at is None:
        return True
    ts = expires_at.timestamp() if hasattr(expires_at, "timestamp") else float(expires_at)
    return ts > time.time()


OwnedT = TypeVar("OwnedT", bound=Model)


def owned_item(model: type[OwnedT], key: str, user_id: str) -> OwnedT | None:
    """The item under `key` if `user_id` owns it, else None: callers answer a stranger's id
    exactly as they answer one that does not exist (no 403 that would confirm it exists)."""
    try:
        item = model.get(key, consistent_read=True)
    except model.DoesNotExist:
        return None
    return item if getattr(item, "user_id", None) == user_id else None


_connection: Connection | None = None


def connection() -> Connection:
    """A low-level connection, for transactions across tables."""
    global _connection
    if _connection is None:
        _connection = Connection(region=_settings.aws_region, host=_settings.aws_endpoint_url)
    return _connection


def iter_registry() -> Iterator[RegistryEntry]:
    """Every registry row, read consistently."""
    return RegistryEntry.scan(consistent_read=True)


def put_once(item: Model, condition: Any) -> bool:
    """Put the item if `condition` holds (the item is not there yet): False, with nothing
    written, when a repeat finds it (a callback delivered twice, a retry after a crash)."""
    try:
        item.save(condition=condition)
    except PutError as failure:
        if failure.cause_response_code == "ConditionalCheckFailedException":
            return False
        raise
    return True


def update_if(record: Model, actions: list[Any], condition: Any) -> bool:
    """Apply a conditional update: False, with nothing changed, when the condition did not hold
    (another callback, submitter, driver or cancel got there first)."""
    try:
        record.update(actions=actions, condition=condition)
    except UpdateError as failure:
        if failure.cause_response_code == "ConditionalCheckFailedException":
            return False
        raise
    return True
