"""The dashboard as a person sees it: a real headless Chromium (Debian's package, driven by
Playwright through its executable path) signs in through the Globus Auth stand-in on the real
local stack. One browser for the module; a screenshot of each page goes to
`test-results/screenshots/` (git-ignored). About 10-15 s on top of the stack."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from first_local.globus_standin import mint_token
from tests.conftest import PROJECT_ROOT
from tests.contract.conftest import Stack

pytestmark = pytest.mark.contract
# In CI the browser tests must run: a missing chromium or playwright fails there, not skips.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
if IN_CI:
    import playwright.sync_api as sync_api
else:
    sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
# Playwright's own browser download is not reachable: Debian's chromium, with these flags.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = PROJECT_ROOT / "test-results" / "screenshots"
MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
OTHER_MODEL = "meta-llama/Meta-Llama-3.1-70B-Instruct"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        if IN_CI:
            pytest.fail("no /usr/bin/chromium in CI: `make test` should have installed it")
        pytest.skip("no /usr/bin/chromium: `make test` installs it (apt-get install chromium)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _get(stack: Stack, path: str, user: str) -> Any:
    request = urllib.request.Request(
        stack.base_url + path, headers={"Authorization": f"Bearer {mint_token(user)}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _chat(stack: Stack, user: str, model: str = MODEL) -> str:
    raw = stack.client(user).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": f"hello from {user}"}]
    )
    return str(raw.headers["x-first-request-id"])


def _open(browser: Any, stack: Stack, query: str = "", viewport: dict[str, int] = DESKTOP) -> Any:
    """A fresh browser profile that opens /dashboard and is signed in by the stand-in."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.goto(f"{stack.base_url}/dashboard{query}")
    return page


def _view(page: Any, view: str, shot: str) -> None:
    if not page.url.endswith(f"#{view}"):
        page.evaluate(f"location.hash = '#{view}'")
    page.wait_for_selector(f"body[data-loaded={view}]", timeout=15_000)
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
    page.screenshot(path=str(SCREENSHOTS / f"{shot}.png"), full_page=True)


def test_alice_sees_her_own_numbers_and_nobody_elses(browser: Any, stack: Stack) -> None:
    mine = [_chat(stack, "alice"), _chat(stack, "alice", OTHER_MODEL)]
    daves = _chat(stack, "dave")
    alice = stack.client("alice")
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}]}}
        for i in range(2)
    ]  # fmt: skip
    content = "\n".join(json.dumps(line) for line in lines).encode()
    upload = alice.files.create(file=("in.jsonl", content), purpose="batch")
    batch = alice.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # Its usage row is written when it ends: wait, so the chart and /v1/usage see the same rows.
    deadline = time.monotonic() + 30
    while alice.batches.retrieve(batch.id).status != "completed":
        assert time.monotonic() < deadline, "the batch did not complete"
        time.sleep(0.2)
    page = _open(browser, stack, viewport=PHONE)
    _view(page, "usage", "usage-alice-phone")

    # The chart has her numbers: what GET /v1/usage says, day by day and model by model.
    usage = _get(stack, "/v1/usage", "alice")["data"]
    drawn = page.evaluate(
        """() => Chart.getChart(document.getElementById('usage-chart')).data.datasets
                 .map(d => [d.label, d.data.reduce((a, b) => a + b, 0)])"""
    )
    expected = {
        f"{model} tokens": sum(d["total_tokens"] for d in usage if d["model"] == model)
        for model in {d["model"] for d in usage}
    }
    expected["requests"] = sum(d["requests"] for d in usage)
    assert dict(drawn) == expected
    assert expected["requests"] >= 2 and expected[f"{OTHER_MODEL} tokens"] > 0
    assert page.locator("#usage-requests").text_content() == f"{expected['requests']:,}"
    assert page.locator("#usage-table tbody tr").count() == len(usage)

    # Her requests, not Dave's; a request's detail.
    _view(page, "requests", "requests-alice-phone")
    listed = page.locator("#requests-table").text_content() or ""
    assert all(request_id in listed for request_id in mine)
    assert daves not in listed
    page.get_by_role("button", name=mine[-1]).click()
    page.wait_for_selector("#request-detail:not([hidden])")
    assert '"status": "completed"' in (page.locator("#request-detail-body").text_content() or "")
    _view(page, "batches", "batches-alice-phone")
    assert batch.id in (page.locator("#batches-table").text_content() or "")
    download = page.locator(f"#files-table tr:has-text('{upload.id}') a")
    fetched = page.request.get(f"{stack.base_url}/{download.get_attribute('href')}")
    assert fetched.status == 200 and fetched.body() == content
    _view(page, "models", "models-alice-phone")
    assert MODEL in (page.locator("#models-table").text_content() or "")

    # No admin view for her, and the admin routes refuse her session.
    assert page.locator("#tabs .admin-only").is_hidden()
    assert page.request.get(f"{stack.base_url}/v1/admin/activity").status == 403

    # The session is a cookie no script can read; no token in storage or in the address.
    session = next(c for c in page.context.cookies() if c["name"] == "first_session")
    assert session["httpOnly"] and session["sameSite"] == "Lax" and not session["secure"]
    assert "first_session" not in page.evaluate("document.cookie")
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert "code=" not in page.url and "token" not in page.url
    page.context.close()


def test_dave_sees_every_user_and_the_maintenance_switch_takes_effect(
    browser: Any, stack: Stack
) -> None:
    _chat(stack, "alice")
    _chat(stack, "dave")
    with pytest.raises(openai.PermissionDeniedError):
        _chat(stack, "bob")  # a refusal: in the metrics, not in any row
    deadline = time.monotonic() + 10
    while "403" not in _get(stack, "/v1/admin/activity?hours=1", "dave")["refusals"]["by_status"]:
        assert time.monotonic() < deadline, "the refusal never reached the metrics"
        time.sleep(0.2)
    page = _open(browser, stack, "?user=dave#admin")
    _view(page, "admin", "admin-dave")
    assert "HTTP 403" in (page.locator("#admin-refusals").text_content() or "")
    assert page.locator("#kpi-refusals").text_content() != "\u2013"
    users = page.locator("#admin-users").text_content() or ""
    assert "alice@anl.gov" in users and "dave@anl.gov" in users
    drawn = page.evaluate(
        "() => Chart.getChart(document.getElementById('admin-users-chart')).data.labels"
    )
    assert {"alice@anl.gov", "dave@anl.gov"} <= set(drawn)
    assert "alice@anl.gov" in (page.locator("#admin-log").text_content() or "")

    def polaris_states() -> set[str]:
        models = _get(stack, "/v1/models", "alice")["data"]
        return {m["states"]["polaris"] for m in models if "polaris" in m["states"]}

    def until(done: Any) -> None:
        """A health poll under way when the switch flips may write the old status once; the
        next poll (every 10 s) keeps the switch."""
        deadline = time.monotonic() + 15
        while not done():
            assert time.monotonic() < deadline, polaris_states()
            time.sleep(0.2)

    try:
        page.get_by_role("button", name="Put polaris in maintenance").click()
        assert page.locator("#confirm").is_visible()
        page.get_by_role("button", name="Confirm").click()
        page.get_by_role("button", name="Take polaris out of maintenance").wait_for()
        until(lambda: polaris_states() == {"maintenance"})
        page.screenshot(path=str(SCREENSHOTS / "admin-dave-maintenance.png"), full_page=True)
        # A federated request for a model both clusters serve now goes to sophia.
        raw = stack.client("alice").chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "where?"}]
        )
        assert raw.headers["x-first-cluster"] == "sophia"
        page.get_by_role("button", name="Take polaris out of maintenance").click()
        page.get_by_role("button", name="Confirm").click()
        page.get_by_role("button", name="Put polaris in maintenance").wait_for()
        until(lambda: "maintenance" not in polaris_states())
    finally:
        urllib.request.urlopen(
            urllib.request.Request(
                f"{stack.base_url}/v1/admin/clusters/polaris/maintenance",
                data=b'{"maintenance": false}',
                headers={
                    "Authorization": f"Bearer {mint_token('dave')}",
                    "Content-Type": "application/json",
                },
            ),
            timeout=10,
        )
    page.context.close()


def test_a_user_the_gateway_refuses_gets_a_page_saying_why(browser: Any, stack: Stack) -> None:
    page = _open(browser, stack, "?user=bob")
    assert page.locator("h1").text_content() == "Not signed in"
    assert "not a member" in (page.locator("[role=alert]").text_content() or "")
    assert not any(c["name"] == "first_session" for c in page.context.cookies())
    page.screenshot(path=str(SCREENSHOTS / "refused-bob.png"), full_page=True)
    page.context.close()
