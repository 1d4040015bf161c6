"""Batches end to end: the real `openai` package's `files` and `batches` against the local stack,
whose batch function (compute_funcs/batch.py) runs in the local pool against the mock vLLM;
and FIRST's cluster-path batches, validated by FIRST's own fixtures.

Every test waits for its batches to end (or cancels them): a user may run only
`max_concurrent_batches_per_user` (2) at once, and the session stack is shared.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from first_local.globus_standin import mint_token
from tests.conftest import CALLBACK_SECRET
from tests.contract.conftest import Stack
from tests.support.contract import (
    MODEL,
    jsonl,
    line,
    rows,
    start,
    upload,
    usage_rows,
    wait_for,
)

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "first-fixtures"


# ---- OpenAI batches ----------------------------------------------------------------------------


def test_thousand_line_batch_from_upload_to_output(stack: Stack) -> None:
    client = stack.client()
    failing = {f"req-{i}" for i in (17, 503, 998)}
    lines = [
        line(f"req-{i}", f"question {i}" + (" [mock:error]" if f"req-{i}" in failing else ""))
        for i in range(1000)
    ]
    batch = start(client, lines, metadata={"project": "contract"})
    assert batch.status in ("validating", "in_progress")
    assert batch.request_counts is not None and batch.request_counts.total == 1000
    assert batch.metadata == {"project": "contract"}

    batch = wait_for(client, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (997, 3)
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert getattr(batch, stamp) is not None, stamp

    answered = rows(client, batch.output_file_id)
    errors = rows(client, batch.error_file_id)
    ids = [r["custom_id"] for r in answered + errors]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(1000))  # every one, once
    assert {r["custom_id"] for r in errors} == failing
    for row in answered:
        assert row["response"]["status_code"] == 200 and row["error"] is None
        assert row["response"]["body"]["choices"][0]["message"]["content"]
    for row in errors:
        assert row["response"]["status_code"] >= 400

    # Usage: the batch's totals are the sum of its answers', and one usage record says so.
    prompt = sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in answered)
    completion = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in answered)
    assert batch.usage is not None
    assert (batch.usage.input_tokens, batch.usage.output_tokens) == (prompt, completion)
    records = usage_rows(stack, batch.id)
    assert len(records) == 1
    assert int(records[0]["total_tokens"]) == prompt + completion

    # Too large to answer inline: a redirect to a presigned S3 URL, which the SDK followed above.
    content_url = f"{stack.base_url}/v1/files/{batch.output_file_id}/content"
    redirect = httpx.get(content_url, headers={"Authorization": f"Bearer {client.api_key}"})
    assert redirect.status_code == 302
    assert "X-Amz-Signature=" in redirect.headers["location"]
    assert httpx.get(redirect.headers["location"]).content.decode().splitlines() == [
        json.dumps(r, separators=(",", ":")) for r in answered
    ]
    # The output files are the owner's files, listed and fetched like any other.
    listed = {f.id for f in client.files.list()}
    assert {batch.input_file_id, batch.output_file_id, batch.error_file_id} <= listed
    output = client.files.retrieve(batch.output_file_id)
    assert output.purpose == "batch_output" and output.bytes > 0
    assert batch.id in {b.id for b in client.batches.list()}


def test_bad_input_line_is_refused_with_its_number(stack: Stack) -> None:
    client = stack.client()
    good = [line(f"ok-{i}", "fine") for i in range(6)]
    before = {f.id for f in client.files.list()}
    cases = {
        "not json": "{this is not json",
        "no messages": json.dumps(
            {
                "custom_id": "x",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL},
            }
        ),
        "custom_id": line("ok-2", "a second ok-2"),
        "url": json.dumps(
            {"custom_id": "y", "method": "POST", "url": "/v1/images", "body": {"model": MODEL}}
        ),
    }
    for problem, bad in cases.items():
        with pytest.raises(openai.BadRequestError) as refused:
            upload(client, [*good, bad])
        error = refused.value.body
        assert isinstance(error, dict)
        assert error["message"].startswith("Line 7 of the file"), (problem, error)
        assert error["code"] == "invalid_batch_line" and error["param"] == "file"
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("empty.jsonl", b"\n\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError) as wrong_purpose:
        client.files.create(file=("x.jsonl", jsonl(good)), purpose="fine-tune")
    assert isinstance(wrong_purpose.value.body, dict)
    assert wrong_purpose.value.body["param"] == "purpose"
    assert {f.id for f in client.files.list()} == before  # nothing refused was kept


def test_a_file_that_does_not_fit_the_batch_fails_validation(stack: Stack) -> None:
    client = stack.client()
    file = upload(client, [line("a", "one")])
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data
    assert batch.errors.data[0].code == "mismatched_endpoint"
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=file.id,
            endpoint="/v1/chat/completions",
            completion_window="1h",  # type: ignore[arg-type]
        )


def test_cancel_mid_way_keeps_what_was_done(stack: Stack) -> None:
    client = stack.client()
    # 100 lines a chunk, 8 at a time, 100 ms each: about 1.3 s a chunk.
    lines = [line(f"c-{i}", f"slow {i} [mock:delay=100]") for i in range(600)]
    batch = start(client, lines)
    wait_for(client, batch.id, lambda b: b.request_counts.completed >= 100, timeout=60)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_for(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    assert batch.request_counts is not None
    done = batch.request_counts.completed
    assert 100 <= done < 600
    answered = rows(client, batch.output_file_id)
    assert len(answered) == done
    assert len({r["custom_id"] for r in answered}) == done  # each once
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(wait_for(client, start(client, [line("q", "quick")]).id).id)


def test_another_users_batch_and_file_ids_answer_404(stack: Stack) -> None:
    alice = stack.client("alice")
    dave = stack.client("dave")  # allowed, and an admin: still not the owner
    batch = wait_for(alice, start(alice, [line("mine", "private")]).id)
    assert batch.status == "completed"
    objects = [batch.input_file_id, batch.output_file_id]
    for file_id in [*objects, "file-doesnotexist"]:
        for call in (
            dave.files.retrieve,
            dave.files.content,
            dave.files.delete,
        ):
            with pytest.raises(openai.NotFoundError) as missing:
                call(file_id)
            assert isinstance(missing.value.body, dict)
            assert file_id in missing.value.body["message"]
    for batch_id in (batch.id, "batch_doesnotexist"):
        with pytest.raises(openai.NotFoundError):
            dave.batches.retrieve(batch_id)
        with pytest.raises(openai.NotFoundError):
            dave.batches.cancel(batch_id)
    with pytest.raises(openai.NotFoundError):
        dave.batches.create(
            input_file_id=batch.input_file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    assert batch.id not in {b.id for b in dave.batches.list()}
    assert not set(objects) & {f.id for f in dave.files.list()}
    # The owner still has everything, and may delete a file.
    assert alice.files.retrieve(batch.output_file_id).id == batch.output_file_id
    assert alice.files.delete(batch.input_file_id).deleted is True
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(batch.input_file_id)


def test_concurrent_batches_per_user_are_limited(stack: Stack) -> None:
    client = stack.client()
    slow = [line(f"s-{i}", f"slow {i} [mock:delay=200]") for i in range(400)]
    running = [start(client, slow), start(client, slow)]
    with pytest.raises(openai.RateLimitError) as refused:
        start(client, slow)
    assert refused.value.response.headers.get("retry-after")
    for batch in running:
        client.batches.cancel(batch.id)
    for batch in running:
        assert wait_for(client, batch.id).status == "cancelled"
    # The slots came back: a new batch starts.
    assert wait_for(client, start(client, [line("after", "again")]).id).status == "completed"


def test_killed_worker_resumes_from_its_checkpoint(stack: Stack) -> None:
    client = stack.client()
    lines = [line(f"k-{i}", f"resume {i} [mock:delay=60]") for i in range(600)]
    batch = start(client, lines)
    batch = wait_for(client, batch.id, lambda b: b.request_counts.completed >= 200, timeout=60)
    owner = Path(stack.state["cluster_fs"]) / ".first" / "batches" / batch.id / "owner.json"
    worker = json.loads(owner.read_text())
    assert worker["attempt"] == 1
    os.kill(worker["pid"], signal.SIGKILL)

    batch = wait_for(client, batch.id, timeout=120)
    assert batch.status == "completed", batch
    extra = batch.model_extra or {}
    assert extra["attempts"] == 2
    assert extra["resumed_lines"] >= 200  # the second attempt skipped the checkpointed chunks
    answered = rows(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in answered) == sorted(f"k-{i}" for i in range(600))


# ---- FIRST's cluster-path batches --------------------------------------------------------------


def first_url(stack: Stack, path: str) -> str:
    return f"{stack.base_url}/resource_server/v1{path}"


def auth(user: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(user)}"}


def test_first_batch_fixtures_validate(stack: Stack) -> None:
    url = first_url(stack, "/sophia/vllm/v1/batches")
    for body in json.loads((FIXTURES / "valid_batch.json").read_text()):
        answer = httpx.post(url, json=body, headers=auth())
        # Valid, then refused for what it names: the fixtures' model does not exist.
        assert answer.status_code == 404, (body, answer.text)
        assert answer.json()["error"]["param"] == "model"
    for body in json.loads((FIXTURES / "invalid_batch.json").read_text()):
        answer = httpx.post(url, json=body, headers=auth())
        assert answer.status_code == 400, (body, answer.text)
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


def test_first_batch_on_a_cluster_path(stack: Stack) -> None:
    root = Path(stack.state["cluster_fs"]) / "alice@anl.gov" / "project"  # alice's own
    root.mkdir(exist_ok=True)
    source = root / "prompts.jsonl"
    source.write_bytes(jsonl([line(f"p-{i}", f"path {i}") for i in range(150)]))
    submitted = httpx.post(
        first_url(stack, "/sophia/vllm/v1/batches"),
        json={"input_file": str(source), "model": MODEL, "output_folder_path": str(root / "out")},
        headers=auth(),
    )
    assert submitted.status_code == 200, submitted.text
    batch_id = submitted.json()["batch_id"]
    assert submitted.json()["status"] in ("pending", "running")

    deadline = time.monotonic() + 60
    while (status := httpx.get(first_url(stack, f"/batches/{batch_id}"), headers=auth()).json()) \
            not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, status
        time.sleep(0.25)
    assert status == "completed"
    result = httpx.get(first_url(stack, f"/batches/{batch_id}/result"), headers=auth()).json()
    assert result["request_counts"] == {"total": 150, "completed": 150, "failed": 0}
    written = Path(result["output_file"]).read_text().splitlines()
    assert Path(result["output_file"]).parent == root / "out"
    assert sorted(json.loads(x)["custom_id"] for x in written) == sorted(
        f"p-{i}" for i in range(150)
    )
    listed = httpx.get(first_url(stack, "/batches?status=completed"), headers=auth()).json()
    assert batch_id in {b["batch_id"] for b in listed}
    # Another user cannot have the cluster read alice's file or write into her directory.
    daves = Path(stack.state["cluster_fs"]) / "dave@anl.gov"
    (daves / "x.jsonl").write_bytes(jsonl([line("d", "dave's own")]))
    for body in (
        {"input_file": str(source), "model": MODEL},
        {"input_file": "x.jsonl", "model": MODEL, "output_folder_path": str(root)},
    ):
        stolen = httpx.post(
            first_url(stack, "/sophia/vllm/v1/batches"), json=body, headers=auth("dave")
        ).json()["batch_id"]
        deadline = time.monotonic() + 30
        while (
            httpx.get(first_url(stack, f"/batches/{stolen}"), headers=auth("dave")).json()
            != "failed"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.25)
        refused = httpx.get(first_url(stack, f"/batches/{stolen}/result"), headers=auth("dave"))
        assert refused.status_code == 400, refused.text
        assert "outside the directories" in refused.json()["error"]["message"]
    # Another user: the same 404 as for an id that does not exist.
    for path in (f"/batches/{batch_id}", f"/batches/{batch_id}/result"):
        answer = httpx.get(first_url(stack, path), headers=auth("dave"))
        assert answer.status_code == 404
    assert batch_id not in {
        b["batch_id"] for b in httpx.get(first_url(stack, "/batches"), headers=auth("dave")).json()
    }


def test_first_batch_paths_outside_the_clusters_roots_are_refused(stack: Stack) -> None:
    answer = httpx.post(
        first_url(stack, "/sophia/vllm/v1/batches"),
        json={"input_file": "project/../../etc/passwd", "model": MODEL},
        headers=auth(),
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "input_file"
    # Well-formed, but outside what the endpoint may read: the cluster refuses it.
    answer = httpx.post(
        first_url(stack, "/sophia/vllm/v1/batches"),
        json={"input_file": "/etc/hostname", "model": MODEL},
        headers=auth(),
    )
    assert answer.status_code == 200, answer.text
    batch_id = answer.json()["batch_id"]
    deadline = time.monotonic() + 30
    while httpx.get(first_url(stack, f"/batches/{batch_id}"), headers=auth()).json() != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.25)
    result = httpx.get(first_url(stack, f"/batches/{batch_id}/result"), headers=auth())
    assert result.status_code == 400
    assert "outside the directories this endpoint allows" in result.json()["error"]["message"]


def test_batch_callbacks_need_the_batch_token(stack: Stack) -> None:
    client = stack.client()
    batch = wait_for(client, start(client, [line("cb", "callback")]).id)
    url = f"{stack.base_url}/callbacks/{batch.id}/batch"
    body = {"batch_id": batch.id, "event": "progress", "attempt": 1, "completed": 0}
    other = hmac.new(CALLBACK_SECRET.encode(), b"batch_other", hashlib.sha256).hexdigest()
    for token in ("", "Bearer wrong", f"Bearer {mint_token('alice')}", f"Bearer {other}"):
        answer = httpx.post(url, json=body, headers={"Authorization": token} if token else {})
        assert answer.status_code == 401, answer.text
    # The right token, for a batch that has ended: told to stop, and nothing changes.
    token = hmac.new(CALLBACK_SECRET.encode(), batch.id.encode(), hashlib.sha256).hexdigest()
    answer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and answer.json() == {"continue": False}
    done = {**body, "event": "done", "outcome": "failed", "error": {"code": "x", "message": "y"}}
    answer = httpx.post(url, json=done, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and answer.json() == {"accepted": False}
    after = client.batches.retrieve(batch.id)
    assert after.status == "completed" and after.request_counts is not None
    assert after.request_counts.completed == 1


@pytest.mark.parametrize(
    ("url", "model", "body", "check"),
    [
        (
            "/v1/embeddings",
            "Salesforce/SFR-Embedding-Mistral",
            {"input": "a protein"},
            lambda body: len(body["data"][0]["embedding"]) > 0,
        ),
        (
            "/v1/completions",
            MODEL,
            {"prompt": "Once upon", "max_tokens": 6},
            lambda body: bool(body["choices"][0]["text"]),
        ),
    ],
)
def test_embeddings_and_completions_batches(
    stack: Stack, url: str, model: str, body: dict[str, Any], check: Any
) -> None:
    client = stack.client()
    lines = [
        json.dumps(
            {"custom_id": f"e-{i}", "method": "POST", "url": url, "body": {"model": model, **body}}
        )
        for i in range(20)
    ]
    file = upload(client, lines)
    batch = client.batches.create(
        input_file_id=file.id,
        endpoint=url,  # type: ignore[arg-type]
        completion_window="24h",
    )
    batch = wait_for(client, batch.id)
    assert batch.status == "completed" and getattr(batch, "model", None) == model
    answered = rows(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in answered) == sorted(f"e-{i}" for i in range(20))
    assert all(check(r["response"]["body"]) for r in answered)


def test_a_model_without_batches_and_a_user_without_access_are_refused(stack: Stack) -> None:
    client = stack.client()
    small = "meta-llama/Llama-3.2-1B-Instruct"  # served on polaris, which takes no batches
    file = upload(
        client,
        [
            json.dumps(
                {
                    "custom_id": "x",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": small, "messages": [{"role": "user", "content": "hi"}]},
                }
            )
        ],
    )
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["code"] == "batches_not_supported"
    bob = stack.client("bob")  # signed in, but in none of the gateway's groups
    with pytest.raises(openai.PermissionDeniedError):
        bob.files.list()
    with pytest.raises(openai.PermissionDeniedError):
        bob.batches.list()
