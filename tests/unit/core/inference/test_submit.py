"""Submitting (first_core.inference.submit) when an endpoint refuses: the fallback to another
endpoint, and 503 when none is left."""

from __future__ import annotations

import json
from typing import Any

import pytest

import first_core.compute
import first_core.ratelimit
from first_core import inference
from first_core.compute import budget
from first_core.errors import InvalidRequestError, RateLimitError, ServiceUnavailableError
from first_core.idempotency import check_key
from first_core.inference.submit import max_tokens_ceiling
from first_core.registry import Registry
from first_core.settings import get_settings
from first_core.tables import RegistryEntry, RequestRecord
from tests.support.compute import FakeBackend
from tests.support.identities import ALICE
from tests.support.registry import (
    EMBEDDER,
    ENDPOINT,
    MODEL,
    POLARIS_ENDPOINT,
    SOPHIA_ENDPOINT,
)

pytestmark = pytest.mark.usefixtures("registry_table")


# -- the submit fallback ----------------------------------------------------------------------
def _body(model: str = MODEL) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    ).encode()


def test_endpoint_offline_between_status_read_and_submit_goes_to_the_other(
    fake_backend: FakeBackend,
) -> None:
    """The registry says polaris runs the model (best), but its endpoint refuses the submit."""
    RegistryEntry("polaris", f"vllm#{MODEL}").update(actions=[RegistryEntry.status.set("running")])
    Registry.invalidate()
    fake_backend.refuse.add(POLARIS_ENDPOINT)

    submission = inference.submit(ALICE, "chat/completions", _body())

    assert submission.endpoint.cluster == "sophia"
    assert "after polaris refused the submit" in submission.route_reason
    submits = [c[1] for c in fake_backend.calls if c[0] == "submit"]
    assert submits == [POLARIS_ENDPOINT, SOPHIA_ENDPOINT]
    records = {r.request_id: r for r in RequestRecord.scan(consistent_read=True)}
    assert len(records) == 2
    assert records[submission.request_id].status == "submitted"
    [failed] = [r for r in records.values() if r.request_id != submission.request_id]
    assert failed.status == "failed"


def test_a_named_cluster_that_refuses_the_submit_is_503(fake_backend: FakeBackend) -> None:
    fake_backend.refuse.add(POLARIS_ENDPOINT)

    with pytest.raises(ServiceUnavailableError):
        inference.submit(ALICE, "chat/completions", _body(), cluster="polaris", framework="vllm")

    assert [c[1] for c in fake_backend.calls if c[0] == "submit"] == [POLARIS_ENDPOINT]


def test_every_endpoint_refusing_is_503_after_trying_each_once(fake_backend: FakeBackend) -> None:
    fake_backend.refuse |= {POLARIS_ENDPOINT, SOPHIA_ENDPOINT}

    with pytest.raises(ServiceUnavailableError, match="submit refused"):
        inference.submit(ALICE, "chat/completions", _body())

    assert sorted(c[1] for c in fake_backend.calls if c[0] == "submit") == [
        POLARIS_ENDPOINT,
        SOPHIA_ENDPOINT,
    ]


# -- what was sent, kept for the callback's bounds ---------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "max_tokens", "choices"),
    [
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 7, 3),
        ("completions", {"prompt": ["a", "b"], "n": 2}, 7, 4),  # n choices per prompt
        ("completions", {"prompt": [1, 2, 3]}, 7, 1),  # one prompt of token ids
        ("completions", {"prompt": "a", "n": 2, "best_of": 3}, 7, 3),
        ("embeddings", {"input": ["a", "b"]}, None, 1),
    ],
    ids=["chat-n", "completions-prompts", "completions-token-ids", "best-of", "embeddings"],
)
def test_the_record_keeps_the_bounds_of_what_was_sent(
    fake_backend: FakeBackend,
    path: str,
    body: dict[str, Any],
    max_tokens: int | None,
    choices: int,
) -> None:
    if path != "embeddings":
        body = {**body, "max_tokens": 7}
    raw = json.dumps({"model": MODEL, **body}).encode()

    submission = inference.submit(ALICE, path, raw)

    record = RequestRecord.get(submission.request_id, consistent_read=True)
    assert record.max_tokens == max_tokens
    assert (record.choices, record.prompt_bytes) == (choices, len(raw))


def test_a_prompt_pointing_at_an_image_has_no_prompt_bound(fake_backend: FakeBackend) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}}
    message = {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}
    raw = json.dumps({"model": MODEL, "messages": [message], "max_tokens": 7}).encode()

    submission = inference.submit(ALICE, "chat/completions", raw)

    record = RequestRecord.get(submission.request_id, consistent_read=True)
    assert (record.max_tokens, record.prompt_bytes) == (7, None)


# -- the Globus Compute API budget ------------------------------------------------------------
def test_the_unit_a_request_took_pays_for_its_submit_even_on_a_cold_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first request of a process makes the backend, whose version check spends a unit of
    its own (background work): the request's submit still uses the unit the request took."""
    settings = get_settings()
    monkeypatch.setattr(settings, "compute_api_calls_per_window", 100)
    monkeypatch.setattr(settings, "compute_api_window_seconds", 3600.0)
    takes: list[budget.Priority] = []
    take = budget.try_take

    def recorded_take(now: float | None = None) -> float:
        takes.append(budget._priority.get())
        return take(now)

    class ColdBackend(FakeBackend):
        def __init__(self) -> None:
            super().__init__()
            with budget.priority(budget.Priority.BACKGROUND):
                budget.spend()  # as GlobusComputeBackend's version check does

        def submit(self, endpoint_id: str, function_id: str, kwargs: dict[str, Any]) -> str:
            budget.spend()  # as GlobusComputeBackend.submit does
            return super().submit(endpoint_id, function_id, kwargs)

    monkeypatch.setattr(budget, "try_take", recorded_take)
    monkeypatch.setattr(first_core.compute, "GlobusComputeBackend", ColdBackend)
    monkeypatch.setattr(first_core.compute, "_backend", None)

    submission = inference.submit(ALICE, "chat/completions", _body())

    assert submission.task_id == "task-1"
    # The request's own unit, then the version check's: the submit took nothing more.
    assert takes == [budget.Priority.SUBMIT_NOW, budget.Priority.BACKGROUND]


# -- max_tokens the gateway sends when the caller names none ------------------------------------
def _sent(fake_backend: FakeBackend) -> dict[str, Any]:
    [(_, _, kwargs)] = fake_backend.submits
    return kwargs


def test_a_chat_without_max_tokens_is_sent_the_endpoints_cap(fake_backend: FakeBackend) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    submission = inference.submit(ALICE, "chat/completions", json.dumps(body).encode())

    kwargs = _sent(fake_backend)
    cap = submission.endpoint.limits.max_tokens
    assert cap is not None and kwargs["payload"]["max_tokens"] == cap
    assert kwargs["fitted_max_tokens"] is True
    record = RequestRecord.get(submission.request_id)
    assert record.rate_reservation is not None
    assert record.rate_reservation["tokens"] >= cap
    assert record.max_tokens == cap  # what was sent bounds the callback's completion tokens


def test_a_named_max_tokens_is_sent_as_named_and_not_marked_fitted(
    fake_backend: FakeBackend,
) -> None:
    inference.submit(ALICE, "chat/completions", _body())

    kwargs = _sent(fake_backend)
    assert kwargs["payload"]["max_tokens"] == 5 and "fitted_max_tokens" not in kwargs


def test_a_completion_without_max_tokens_keeps_vllms_default_of_16(
    fake_backend: FakeBackend,
) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time"}
    inference.submit(ALICE, "completions", json.dumps(body).encode())

    assert _sent(fake_backend)["payload"]["max_tokens"] == 16


def test_without_a_cap_the_settings_default_is_the_ceiling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(get_settings(), "default_max_tokens", 777)
    uncapped = ENDPOINT.model_copy(
        update={"limits": ENDPOINT.limits.model_copy(update={"max_tokens": None})}
    )
    capped = ENDPOINT.model_copy(
        update={"limits": ENDPOINT.limits.model_copy(update={"max_tokens": 10})}
    )

    assert max_tokens_ceiling("chat/completions", uncapped) == 777
    assert max_tokens_ceiling("chat/completions", capped) == 10
    assert max_tokens_ceiling("completions", uncapped) == 16
    assert max_tokens_ceiling("completions", capped) == 10


def test_embeddings_are_sent_no_max_tokens(fake_backend: FakeBackend) -> None:
    body = {"model": EMBEDDER, "input": "hello"}
    inference.submit(ALICE, "embeddings", json.dumps(body).encode())

    kwargs = _sent(fake_backend)
    assert "max_tokens" not in kwargs["payload"] and "fitted_max_tokens" not in kwargs


# -- Idempotency-Key: a repeat never starts a second job ----------------------------------------
def test_a_repeat_with_the_same_key_is_the_same_request_and_one_job(
    fake_backend: FakeBackend,
) -> None:
    first = inference.submit(ALICE, "chat/completions", _body(), idempotency_key="k-1")
    again = inference.submit(ALICE, "chat/completions", _body(), idempotency_key="k-1")

    assert again.request_id == first.request_id
    assert len(fake_backend.submits) == 1
    assert "Idempotency-Key" in again.route_reason
    # Another key, or another user with the same key, is a new request.
    other = inference.submit(ALICE, "chat/completions", _body(), idempotency_key="k-2")
    assert other.request_id != first.request_id and len(fake_backend.submits) == 2


def test_the_same_key_with_another_body_is_400(fake_backend: FakeBackend) -> None:
    inference.submit(ALICE, "chat/completions", _body(), idempotency_key="k-1")
    changed = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "bye"}], "max_tokens": 5}
    ).encode()

    with pytest.raises(InvalidRequestError) as refused:
        inference.submit(ALICE, "chat/completions", changed, idempotency_key="k-1")

    assert refused.value.param == "Idempotency-Key"
    assert len(fake_backend.submits) == 1


def test_a_key_refused_by_a_rate_limit_is_free_for_the_next_try(
    fake_backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RateLimitError("over")

    with monkeypatch.context() as patched:
        patched.setattr(first_core.ratelimit, "reserve", refuse)
        with pytest.raises(RateLimitError):
            inference.submit(ALICE, "chat/completions", _body(), idempotency_key="k-1")

    accepted = inference.submit(ALICE, "chat/completions", _body(), idempotency_key="k-1")
    assert accepted.task_id == "task-1" and len(fake_backend.submits) == 1


def test_an_unusable_key_is_400() -> None:
    with pytest.raises(InvalidRequestError):
        check_key("x" * 256)
    with pytest.raises(InvalidRequestError):
        check_key("caf\u00e9")
    assert check_key(None) is None and check_key("abc-123") == "abc-123"
