"""first_core.observability: JSON log lines and CloudWatch EMF metric lines."""

from __future__ import annotations

import json
import logging

import pytest

from first_core import observability


def emitted(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]


def test_a_count_is_one_emf_line_with_its_dimensions(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    observability.count("Requests", Route="chat/completions", Outcome="ok")
    observability.timing("RequestMs", 12.5, Route="embeddings")
    first, second = emitted(capsys)
    declared = first["_aws"]["CloudWatchMetrics"][0]  # type: ignore[index]
    assert declared["Namespace"] == "FIRST"
    assert declared["Dimensions"] == [["service", "stage", "Route", "Outcome"]]
    assert declared["Metrics"] == [{"Name": "Requests", "Unit": "Count"}]
    assert (first["Requests"], first["Route"], first["Outcome"]) == (
        [1.0],
        "chat/completions",
        "ok",
    )
    assert first["service"] == "first-gateway"
    assert second["RequestMs"] == [12.5]
    assert second["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"] == "Milliseconds"  # type: ignore[index]


def test_metrics_can_be_switched_off(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    observability.count("Requests", Route="x")
    assert capsys.readouterr().out == ""


def test_a_metric_that_cannot_be_written_fails_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    # CloudWatch takes at most 30 dimensions: powertools refuses more.
    observability.count("Requests", **{f"d{i}": i for i in range(40)})
    assert "could not emit metric Requests" in caplog.text


def test_first_loggers_write_json_lines(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observability, "_configured", False)
    logger = logging.getLogger("first")
    handlers = list(logger.handlers)
    try:
        observability.configure_logging()
        observability.configure_logging()  # a second call adds no second handler
        assert len(logger.handlers) == len(handlers) + 1
        logging.getLogger("first.batches").warning(
            "batch %s resubmitted", "batch_1", extra={"attempt": 2}
        )
        (line,) = emitted(capsys)
        assert line["message"] == "batch batch_1 resubmitted"
        assert (line["level"], line["service"], line["attempt"]) == ("WARNING", "first-gateway", 2)
    finally:
        logger.handlers = handlers
        logger.propagate = True


def test_metrics_from_many_threads_stay_whole_lines(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: observability.count("Requests", Route=f"r{i}"), range(200)))
    lines = emitted(capsys)  # every line parses alone
    assert sorted(str(line["Route"]) for line in lines) == sorted(f"r{i}" for i in range(200))
