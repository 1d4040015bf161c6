"""The one settings object. Every knob comes from the environment (prefix `FIRST_`).

On AWS the template sets these on each function; the secrets arrive as SSM/Secrets Manager
references resolved at deploy time. Locally `first-gateway dev` sets them before the gateway
is imported, so no code path branches on "local".
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting of the gateway, read once from `FIRST_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="FIRST_", extra="ignore")

    stage: str = "local"
    aws_region: str = "us-east-1"
    # A moto server locally; unset on AWS so boto3/pynamodb use the regional endpoint.
    aws_endpoint_url: str | None = None
    table_prefix: str = "first-local-"
    results_bucket: str = "first-local-results"

    # Globus Auth: the gateway is a confidential client; callers' tokens must carry its scope.
    globus_client_id: str = ""
    globus_client_secret: SecretStr = SecretStr("")
    gateway_scope: str = ""
    # The Globus native app users log in with (first-auth; the dashboard's sign-in), if any.
    native_client_id: str = ""
    allowed_domains: list[str] = Field(default_factory=list)
    allowed_groups: list[str] = Field(default_factory=list)
    admin_groups: list[str] = Field(default_factory=list)
    # Per identity-provider domain, the groups a user signed in through it must be in
    # (JSON, e.g. {"uchicago.edu": ["<group id>"]}); on top of `allowed_groups`.
    domain_groups: dict[str, list[str]] = Field(default_factory=dict)
    # Globus client identities (their ids; for a client identity `sub` == its client id) that
    # may call with their own tokens: no identity-provider/domain check applies to them.
    service_accounts: list[str] = Field(default_factory=list)
    # Globus authentication policies (e.g. high assurance) every session must satisfy.
    authentication_policies: list[str] = Field(default_factory=list)
    # Seconds of clock skew tolerated when checking a token's expiry.
    clock_skew_seconds: int = 5
    # Introspection results are trusted this long (bounded again by the token's own expiry):
    # a cached verdict, in memory and in the table, expires at
    # min(introspection time + token_cache_seconds, token exp). A revoked token works that long.
    token_cache_seconds: int = 600
    # Retries of a Globus call that failed transiently (5xx, 429, network), at most 1 s apart,
    # before the caller gets a 503 asking to retry (globus-sdk's own default is 5 retries,
    # up to 10 s apart: a request would hang for ~12 s during an outage).
    globus_retries: int = 2
    # Group memberships are cached per user (any token of that user) and looked up again
    # after this long.
    groups_cache_seconds: int = 300
    # Verdicts (and users' groups) one instance keeps in memory, least recently used dropped
    # first; the token_cache table keeps the rest.
    token_cache_entries: int = 10_000
    # Tokens Globus refused (inactive, expired, wrong scope, provider, policy) are refused from
    # memory for this long, at most this many of them, without asking Globus again.
    refused_token_cache_seconds: float = 10.0
    refused_token_cache_entries: int = 10_000
    # Failed authentications (a malformed bearer token, or one Globus refused) allowed per client
    # address per window, counted in the rate_counters table across instances; past it, a
    # token that is not already cached is answered 429 before any call to Globus (0 = no limit).
    auth_failures_per_address: int = 100
    auth_failure_window_seconds: int = 60
    # Every call to Globus Auth and Groups gives up after these (then 503 asking to retry); a
    # call that timed out is not retried, so a Globus that hangs costs a caller at most about
    # connect + read seconds.
    globus_connect_timeout_seconds: float = 3.0
    globus_read_timeout_seconds: float = 5.0

    # The dashboard (/dashboard) signs in with `native_client_id`'s authorization code with PKCE
    # (its redirect URI <base URL>/dashboard/callback). Its session cookie is signed with
    # `dashboard_session_secret` (HMAC-SHA256), or, when that is empty, with a key derived from
    # `callback_secret` (so a deploy needs no further secret), and lasts this long.
    dashboard_session_secret: SecretStr = SecretStr("")
    dashboard_session_seconds: int = 45 * 60

    # Callbacks from the clusters come back to this URL, signed with this secret.
    public_base_url: str = "http://127.0.0.1:8000"
    callback_secret: SecretStr = SecretStr("")

    # Globus Compute allows a client 20 API calls per 10 s; every function's calls draw on one
    # budget of `compute_api_calls_per_window` per `compute_api_window_seconds` (compute/budget.py:
    # 3 per 2 s is 15 per 10 s on average and never more than 18 in any 10 s), of which the last
    # `compute_api_queue_reserve` per window only the submitter of queued requests may take.
    # 0 calls: no budget (every call is made at once, and the SDK retries what the service
    # refuses).
    compute_api_calls_per_window: int = 3
    compute_api_window_seconds: float = 2.0
    compute_api_queue_reserve: int = 1
    # Requests the budget cannot submit at once wait here (an SQS queue URL) for the submitter,
    # which sends all of one endpoint's in one Globus Compute batch.
    submit_queue_url: str = ""
    # A submitter's claim on a queued request older than this is stale (its submitter stopped):
    # longer than a submitter runs (its Lambda timeout).
    submit_claim_seconds: float = 120.0
    # How long the proxy waits for a result before answering 504 with the request id.
    result_wait_seconds: float = 300.0
    # The proxy writes a request's task id (which only the reconciler reads, to look up a task
    # whose callback was lost) only if the answer has not come within this long: most answers
    # come sooner, and a request that has ended needs no lookup. Keep it well under
    # `reconcile_grace_seconds`.
    task_id_write_after_seconds: float = 1.0
    # A stream's headers wait this long for its first event, so that a stream vLLM refuses at
    # once gets an HTTP error status rather than a 200 with an error event.
    stream_error_wait_seconds: float = 2.0
    # Largest answer kept inline on its request record (a DynamoDB item maxes out at 400 KB, and
    # the record's other attributes take a few KB); larger goes to S3. A stream batch's cap too.
    inline_result_bytes: int = 300_000
    max_payload_bytes: int = 10 * 1024 * 1024
    # Result and chunk rows expire after this long.
    result_ttl_seconds: int = 7 * 24 * 3600
    # Rate limits where the registry endpoint's `limits` name none (0 = no limit).
    default_requests_per_second_per_user: float = 20.0
    default_tokens_per_minute_per_user: int = 200_000
    default_tokens_per_minute: int = 0
    # The max_tokens the gateway sends (and reserves) for a chat request that names none, on an
    # endpoint without a `max_tokens` cap; less when the caller's token budget has less left.
    default_max_tokens: int = 4096
    # Usage records (one per request) are kept this long.
    usage_retention_days: int = 400
    # GET /v1/usage covers at most this many days at once.
    usage_max_days: int = 366
    # The registry table is re-read at most this often per function instance.
    registry_cache_seconds: float = 5.0
    # The reconciler (first_core.inference.reconciler) looks at open requests older than this,
    # and ends those whose task is still pending after `request_deadline_seconds` as timed_out.
    reconcile_grace_seconds: float = 120.0
    request_deadline_seconds: float = 6 * 3600.0

    # Structured logs and metrics (first_core.observability).
    log_level: str = "INFO"
    metrics_namespace: str = "FIRST"

    # Batches (first_core.batches). An uploaded file is one request body, so
    # API Gateway's 10 MB payload limit bounds it before `max_payload_bytes` does; larger jobs
    # use FIRST's batches, whose input is already on the cluster.
    max_batch_lines: int = 50_000
    max_concurrent_batches_per_user: int = 2
    # Lines per checkpointed chunk on the cluster: a restarted job loses at most one chunk.
    batch_chunk_lines: int = 100
    # Attempts of one batch (a killed worker, a lost endpoint) before it fails.
    batch_max_attempts: int = 3
    # File contents up to this size are answered inline; larger ones redirect (302) to a
    # presigned S3 URL (a Lambda response holds at most 6 MB).
    file_inline_bytes: int = 4_000_000
    # Life of the presigned URLs the gateway hands to the clusters and to clients.
    presigned_url_seconds: int = 3600
    # Files (uploads and batch outputs) expire after this many days, record and bytes alike
    # (the bucket's lifecycle rule for files/ and batches/ is the template's BatchRetentionDays).
    file_retention_days: int = 30


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings (read from the environment on first use)."""
    return Settings()
