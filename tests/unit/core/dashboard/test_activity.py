"""What the dashboard reads: a user's own requests (paged, nobody else's), and the admins'
figures and request log from the usage rows (first_core.dashboard.history, .activity)."""

from __future__ import annotations

import json
import time

import pytest

from first_core import usage
from first_core.auth import Caller
from first_core.dashboard import activity, history
from first_core.errors import NotFoundError, PermissionDeniedError
from first_core.settings import get_settings
from first_core.tables import RequestRecord
from first_core.usage import Usage

ADMIN_GROUP = "admins-group-id"


def caller(name: str, *, admin: bool = False) -> Caller:
    return Caller(
        user_id=f"{name}-id",
        username=f"{name}@anl.gov",
        name=name.title(),
        email=f"{name}@anl.gov",
        idp_domain="anl.gov",
        idp_name="Argonne",
        groups=frozenset({ADMIN_GROUP} if admin else set()),
    )


ALICE, BOB, DAVE = caller("alice"), caller("bob"), caller("dave", admin=True)


@pytest.fixture(autouse=True)
def _admins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_settings(), "admin_groups", [ADMIN_GROUP])


def _ended(who: Caller, request_id: str, created: float, *, model: str = "m1", ms: int = 100,
           tokens: int = 10, status: str = "completed") -> None:  # fmt: skip
    """An ended request as the request path leaves it: its record and its usage row."""
    RequestRecord(
        request_id, user_id=who.user_id, username=who.username, model=model, cluster="sophia",
        framework="vllm", endpoint_id="e", openai_path="chat/completions", status=status,
        created_at=created, updated_at=created + ms / 1000, completed_at=created + ms / 1000,
        total_tokens=tokens,
    ).save()  # fmt: skip
    usage.save_once(
        usage.usage_row(
            user_id=who.user_id, username=who.username, request_id=request_id, model=model,
            cluster="sophia", openai_path="chat/completions", stream=False, status=status,
            usage=Usage(tokens // 2, tokens - tokens // 2, tokens), created=created,
            completed=created + ms / 1000,
        )
    )  # fmt: skip


def test_a_user_lists_only_their_own_requests_newest_first_and_paged(aws: None) -> None:
    now = time.time()
    for n in range(3):
        _ended(ALICE, f"req_alice{n}", now - 60 + n, ms=250 + n)
    _ended(BOB, "req_bob0", now - 30)
    first = history.own_requests(ALICE, 2, None)
    assert [r["id"] for r in first["data"]] == ["req_alice2", "req_alice1"]
    assert first["has_more"] is True
    assert first["data"][0]["latency_ms"] == 252
    assert first["data"][0]["usage"]["total_tokens"] == 10
    second = history.own_requests(ALICE, 2, first["last_id"])
    assert [r["id"] for r in second["data"]] == ["req_alice0"]
    assert second["has_more"] is False
    # Bob's request id is no cursor for Alice: the same 404 as a missing one.
    with pytest.raises(NotFoundError):
        history.own_requests(ALICE, 2, "req_bob0")


def test_admins_see_everyones_figures_and_others_are_refused(aws: None) -> None:
    now = time.time()
    for n, ms in enumerate((100, 200, 300, 4000)):
        _ended(ALICE, f"req_a{n}", now - 100 - n, ms=ms, tokens=10)
    _ended(DAVE, "req_d0", now - 50, model="m2", ms=50, tokens=7)
    _ended(DAVE, "req_d1", now - 40, model="m2", ms=60, tokens=0, status="failed")
    _ended(BOB, "req_old", now - 30 * 3600)  # outside a 24 h window
    with pytest.raises(PermissionDeniedError):
        activity.activity(ALICE, "24", now)
    seen = activity.activity(DAVE, "24", now)
    assert seen["totals"] == {"requests": 6, "tokens": 47, "users": 2}
    assert seen["outcomes"]["by_status"] == {"completed": 5, "failed": 1}
    assert seen["outcomes"]["error_rate"] == round(1 / 6, 4)
    m1 = next(m for m in seen["models"] if m["model"] == "m1")
    assert (m1["requests"], m1["users"], m1["tokens"]) == (4, 1, 40)
    assert (m1["latency_ms"]["p50"], m1["latency_ms"]["p99"]) == (200, 4000)
    assert sum(m1["latency_ms"]["histogram"]) == 4
    assert [(u["username"], u["requests"]) for u in seen["users"]] == [
        ("alice@anl.gov", 4),
        ("dave@anl.gov", 2),
    ]
    assert seen["live"]["requests_per_minute"] == round(6 * 60 / 300, 2)
    assert sum(seen["series"]["models"]["m1"]["requests"]) == 4
    # A 48 h window reaches Bob's older request.
    assert activity.activity(DAVE, "48", now)["totals"]["users"] == 3


def test_the_admins_request_log_filters_and_pages(aws: None) -> None:
    now = time.time()
    for n in range(3):
        _ended(ALICE, f"req_a{n}", now - 100 + n)
    _ended(DAVE, "req_d0", now - 10, status="failed")
    with pytest.raises(PermissionDeniedError):
        history.request_log(ALICE, {}, 10, now)
    everyone = history.request_log(DAVE, {}, 10, now)
    assert [r["id"] for r in everyone["data"]] == ["req_d0", "req_a2", "req_a1", "req_a0"]
    alices = history.request_log(DAVE, {"user": "alice@anl.gov"}, 2, now)
    assert [r["id"] for r in alices["data"]] == ["req_a2", "req_a1"] and alices["has_more"]
    rest = history.request_log(DAVE, {"user": "alice-id", "after": alices["last_id"]}, 2, now)
    assert [r["id"] for r in rest["data"]] == ["req_a0"]
    failed = history.request_log(DAVE, {"status": "failed"}, 10, now)
    assert [r["id"] for r in failed["data"]] == ["req_d0"]


def test_refusals_come_from_the_gateways_metrics_of_this_stage(aws: None) -> None:
    import boto3

    from first_local.metrics import metric_data

    settings = get_settings()
    cloudwatch = boto3.client("cloudwatch", region_name=settings.aws_region)
    now = time.time()
    stamp = int(now * 1000) - 1000

    def emf(stage: str, name: str, **dimensions: str) -> str:
        names = ["service", "stage", *dimensions]
        meta = {"Namespace": settings.metrics_namespace, "Dimensions": [names],
                "Metrics": [{"Name": name, "Unit": "Count"}]}  # fmt: skip
        line = {"_aws": {"Timestamp": stamp, "CloudWatchMetrics": [meta]},
                "service": "first-gateway", "stage": stage, **dimensions, name: [1.0]}  # fmt: skip
        return json.dumps(line)

    lines = [
        emf(settings.stage, "Refused", Status="403", Code="permission_denied"),
        emf(settings.stage, "Refused", Status="403", Code="permission_denied"),
        emf(settings.stage, "Refused", Status="429", Code="rate_limit_exceeded"),
        emf("prod", "Refused", Status="401", Code="invalid_token"),  # another stage's
        emf(settings.stage, "Requests", Route="chat", Outcome="ok"),
        emf(settings.stage, "Requests", Route="chat", Outcome="ok"),
        emf(settings.stage, "Requests", Route="chat", Outcome="ok"),
        emf(settings.stage, "Requests", Route="chat", Outcome="refused"),
    ]
    for line in lines:
        for namespace, datum in metric_data(line):
            cloudwatch.put_metric_data(Namespace=namespace, MetricData=[datum])
    seen = activity.activity(DAVE, "1", now)["refusals"]
    assert seen["available"] is True
    assert seen["by_status"] == {"403": 2, "429": 1}
    assert seen["by_code"] == {"permission_denied": 2, "rate_limit_exceeded": 1}
    assert seen["requests_by_outcome"] == {"ok": 3, "refused": 1}
    assert seen["refusal_rate"] == 0.25
