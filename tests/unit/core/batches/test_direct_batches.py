"""OpenAI batches on a direct backend, run by the batch driver a chunk at a time
(first_core.batches.direct), against a mock upstream served in this process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from first_core import storage
from first_core.batches import driver, lifecycle
from first_core.errors import InvalidRequestError
from first_core.registry import Registry, load_file, publish
from first_core.settings import get_settings
from first_core.tables import BatchRecord
from first_local.mock_vllm import MockConfig, create_app
from tests.support.asgi import serve
from tests.support.batches import jsonl, upload
from tests.support.identities import CALLER

MODEL = "gpt-x"


def line(i: int, **body: object) -> dict[str, object]:
    return {
        "custom_id": f"r{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body},
    }


@pytest.fixture
def direct_registry(aws: None, tmp_path: Path) -> Iterator[str]:
    """`cloud`: a direct backend serving MODEL (batches on), a mock upstream that wants a key."""
    with serve(create_app(MockConfig(models=("provider/gpt-x",), api_key="k"))) as url:
        path = tmp_path / "registry.yaml"
        path.write_text(
            "clusters:\n  cloud:\n    endpoints:\n      - backend: direct\n"
            f"        base_url: {url}/v1\n        models: [{MODEL}]\n"
            f"        upstream_names: {{{MODEL}: provider/gpt-x}}\n"
            "        api_key_env: CLOUD_KEY\n        batches: true\n"
        )
        publish(load_file(path))
        Registry.invalidate()
        yield url


def test_a_direct_batch_runs_a_chunk_per_driver_run_then_finalizes(
    direct_registry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUD_KEY", "k")
    monkeypatch.setattr(get_settings(), "batch_chunk_lines", 2)
    failing = line(9, messages=[{"role": "user", "content": "[mock:error]"}])
    file = upload(jsonl(*(line(i, max_tokens=3 + i) for i in range(3)), failing))
    body = {"input_file_id": file.file_id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}
    batch = lifecycle.create_openai(CALLER, json.dumps(body).encode())
    assert batch.task_id == "direct" and batch.status == "in_progress"

    driver.drive()  # lines 1-2
    record = BatchRecord.get(batch.batch_id, consistent_read=True)
    assert (record.completed, record.failed, record.status) == (2, 0, "in_progress")
    driver.drive()  # lines 3-4 (the fourth fails upstream: a 500)
    driver.drive()  # nothing left: finalized
    record = BatchRecord.get(batch.batch_id, consistent_read=True)

    assert record.status == "completed"
    assert (record.completed, record.failed) == (3, 1)
    assert record.completion_tokens == 3 + 4 + 5
    text = storage.get(f"batches/{batch.batch_id}/output.jsonl").decode()
    output = [json.loads(x) for x in text.splitlines()]
    assert [row["custom_id"] for row in output] == ["r0", "r1", "r2"]
    assert all(row["response"]["body"]["model"] == MODEL for row in output)
    assert record.output_file_id and record.error_file_id


def test_a_first_batch_on_a_direct_backend_is_refused_before_anything_is_written(
    direct_registry: str,
) -> None:
    body = {"model": MODEL, "input_file": "/data/in.jsonl"}

    with pytest.raises(InvalidRequestError) as refused:
        lifecycle.create_first(CALLER, "cloud", "vllm", json.dumps(body).encode())

    assert refused.value.code == "batches_not_supported"
    assert list(BatchRecord.scan()) == []
