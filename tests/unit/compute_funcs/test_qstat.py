"""The qstat compute function: the models vLLM lists without PBS, and what PBS reports."""

from __future__ import annotations

import json
import os
import stat
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from compute_funcs.qstat import qstat
from tests.support.registry import (
    MODEL,
    SMALL_MODEL,
)


# -- the qstat compute function ---------------------------------------------------------------
class _Models(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": MODEL}, {"id": "other"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_qstat_without_pbs_reports_the_models_vllm_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PATH", "/nonexistent")
        monkeypatch.setenv("VLLM_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
        answer = qstat([MODEL, SMALL_MODEL])
    finally:
        server.shutdown()
    assert answer == {
        "source": "vllm",
        "models": {MODEL: "running", SMALL_MODEL: "stopped"},
        "free_nodes": None,
        "error": None,
    }


def test_qstat_without_pbs_and_no_vllm_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("VLLM_BASE_URL", "http://127.0.0.1:9/v1")
    answer = qstat([MODEL])
    assert answer["models"] == {MODEL: "stopped"}
    assert answer["error"]


def test_qstat_reads_pbs_jobs_and_free_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = {
        "Jobs": {
            "1.pbs": {"Job_Name": f"vllm {MODEL}", "job_state": "R", "comment": "Job run"},
            "2.pbs": {
                "Job_Name": "vllm",
                "Variable_List": f"MODEL={SMALL_MODEL}",
                "job_state": "Q",
            },
            "3.pbs": {
                "Job_Name": "vllm-70b",
                "job_state": "R",
                "Variable_List": "MODEL=meta-llama/Meta-Llama-3.1-70B-Instruct",
                "comment": "starting vLLM",
            },
        }
    }
    nodes = {"nodes": {"n1": {"state": "free"}, "n2": {"state": "busy"}, "n3": {"state": "free"}}}
    for name, data in (("qstat", jobs), ("pbsnodes", nodes)):
        script = tmp_path / name
        script.write_text(f"#!/bin/sh\ncat <<'JSON'\n{json.dumps(data)}\nJSON\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    answer = qstat([MODEL, SMALL_MODEL, "meta-llama/Meta-Llama-3.1-70B-Instruct", "absent"])

    assert answer["source"] == "pbs"
    assert answer["models"] == {
        MODEL: "running",
        SMALL_MODEL: "queued",
        "meta-llama/Meta-Llama-3.1-70B-Instruct": "starting",
        "absent": "stopped",
    }
    assert answer["free_nodes"] == 2
    assert answer["error"] is None
