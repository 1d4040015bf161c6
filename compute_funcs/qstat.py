"""The qstat function that runs ON a cluster's Globus Compute endpoint: which models run there.

Serialized and shipped like the inference function: standard library only, imports inside the
body. On a PBS cluster it reads `qstat -f -F json` (jobs) and `pbsnodes -a -F json` (free nodes);
a job serves a model when the model's name appears in its name, its variables or its comment.
Where there is no `qstat` (the local stack) it asks vLLM (`VLLM_BASE_URL`) for `/v1/models`:
a listed model is running.

Returns `{"source": "pbs" | "vllm", "models": {model: "running" | "starting" | "queued" |
"stopped"}, "free_nodes": int | None, "error": str | None}`.
"""

from __future__ import annotations

from typing import Any


def qstat(models: list[str] | None = None) -> dict[str, Any]:
    """The state of each named model on this cluster and its free nodes: from PBS when `qstat`
    exists, otherwise from what the node's vLLM lists."""
    import json
    import os
    import shutil
    import subprocess
    import urllib.error
    import urllib.request

    wanted = list(models or [])
    states: dict[str, str] = {m: "stopped" for m in wanted}
    rank = {"stopped": 0, "queued": 1, "starting": 2, "running": 3}

    def better(model: str, state: str) -> None:
        if rank[state] > rank.get(states.get(model, "stopped"), 0):
            states[model] = state

    if shutil.which("qstat") is None:
        base_url = os.environ.get("VLLM_BASE_URL", "http://127.0.0.1:8000/v1").rstrip("/")
        headers = {}
        api_key = os.environ.get("VLLM_API_KEY")
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(f"{base_url}/models", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                listed = [m.get("id") for m in json.loads(response.read()).get("data", [])]
        except (urllib.error.URLError, OSError, ValueError) as failure:
            return {"source": "vllm", "models": states, "free_nodes": None, "error": str(failure)}
        for model in listed:
            if isinstance(model, str) and (not wanted or model in wanted):
                better(model, "running")
        return {"source": "vllm", "models": states, "free_nodes": None, "error": None}

    def run_json(command: list[str]) -> dict[str, Any]:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()[:500]}")
        return dict(json.loads(done.stdout or "{}"))

    problem: str | None = None
    try:
        jobs = run_json(["qstat", "-f", "-F", "json"]).get("Jobs", {}) or {}
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as failure:
        jobs, problem = {}, str(failure)
    for job in jobs.values():
        text = " ".join(
            str(job.get(field, "")) for field in ("Job_Name", "Variable_List", "comment")
        )
        pbs_state = str(job.get("job_state", ""))
        if pbs_state == "R":
            # Running but vLLM not yet answering: the job's comment or variables say so.
            state = "starting" if "starting" in str(job.get("comment", "")).lower() else "running"
        elif pbs_state in {"Q", "H", "W", "T", "S", "B"}:
            state = "queued"
        else:
            continue
        for model in wanted:
            if model in text:
                better(model, state)
    free_nodes = None
    if shutil.which("pbsnodes") is not None:
        try:
            nodes = run_json(["pbsnodes", "-a", "-F", "json"]).get("nodes", {}) or {}
            free_nodes = sum(1 for n in nodes.values() if str(n.get("state", "")) == "free")
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as failure:
            problem = problem or str(failure)
    return {"source": "pbs", "models": states, "free_nodes": free_nodes, "error": problem}
