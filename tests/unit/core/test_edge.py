"""first_core.edge: header bytes and JSON text checked before anything reads them, and
first_core.errors' care for what a message may show a client."""

from __future__ import annotations

import json
from typing import Any

import pytest

from first_core.edge import SECURITY_HEADERS, check_headers, check_unicode, load_json
from first_core.errors import GatewayError, InvalidRequestError, public_message


@pytest.mark.parametrize(
    "value",
    [b"\xff", b"caf\xe9", b"ok \xc3\x28", b"\xed\xa0\x80", "bad \ufffd", "esc \udcff"],
    ids=["0xff", "latin-1", "broken-sequence", "utf8-surrogate", "replaced", "surrogateescape"],
)
def test_a_header_that_is_not_utf8_text_is_400(value: bytes | str) -> None:
    name: bytes | str = b"x-odd" if isinstance(value, bytes) else "x-odd"
    with pytest.raises(InvalidRequestError) as refused:
        check_headers([(name, "fine"), (name, value)] if isinstance(name, str) else [(name, value)])
    assert refused.value.status == 400 and refused.value.code == "invalid_header"
    assert "x-odd" in refused.value.message


def test_a_header_name_that_is_not_utf8_is_400_and_is_not_echoed_raw() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_headers([(b"x-\xff", b"1")])
    assert "\xff" not in refused.value.message and "x-?" in refused.value.message


def test_utf8_headers_pass() -> None:
    check_headers([(b"x-title", "café ☃".encode()), ("user-agent", "OpenAI/Python 1.0")])
    check_headers([])


def test_security_headers() -> None:
    assert SECURITY_HEADERS == {"x-content-type-options": "nosniff", "cache-control": "no-store"}


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "\\ud800"}',
        b'{"\\udfff": 1}',
        b'{"messages": [{"content": [{"text": "a\\uDC00b"}]}]}',
        b'{"stop": ["ok", "\\ud83d"]}',  # a high surrogate with no low one after it
        '{"input": "\\ude00"}',
    ],
)
def test_a_lone_surrogate_anywhere_in_a_body_is_400(body: bytes | str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        load_json(body)
    assert refused.value.status == 400 and refused.value.code == "invalid_unicode"


def test_paired_surrogates_and_escaped_backslashes_are_text() -> None:
    assert load_json(b'{"content": "\\ud83d\\ude00"}') == {"content": "\U0001f600"}
    assert load_json(b'{"content": "\\\\ud800"}') == {"content": "\\ud800"}


def test_bad_json_is_invalid_json() -> None:
    for body in (b"{", b"\xff\xfe", b"[" * 100_000):
        with pytest.raises(InvalidRequestError) as refused:
            load_json(body)
        assert refused.value.code == "invalid_json"


def test_check_unicode_walks_deep_values_without_recursion() -> None:
    deep: Any = "\ud800"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(InvalidRequestError):
        check_unicode(deep)
    check_unicode({"a": [1, 2.5, None, True, {"b": "ok"}]})


def test_a_message_quoting_a_lone_surrogate_stays_encodable() -> None:
    error = InvalidRequestError("Unknown model '\ud800'.", param="model\udfff")
    body = json.dumps(error.to_body(), ensure_ascii=False).encode("utf-8")  # no UnicodeEncodeError
    assert "\ufffd" in error.message and error.param == "model\ufffd"
    assert b"\\ud800" not in body


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        ("RuntimeError: injected fault", "injected fault", "RuntimeError"),
        (
            "concurrent.futures.process.BrokenProcessPool: A process in the process pool was "
            "terminated abruptly",
            "terminated abruptly",
            "BrokenProcessPool",
        ),
        (
            "vLLM at http://10.1.2.3:8000/v1 could not be reached: [Errno 111] refused",
            "could not be reached",
            "10.1.2.3",
        ),
        ("httpx.ConnectError: connect to gpu-node-7.cluster:8000 failed", "failed", "gpu-node-7"),
        (
            'Traceback (most recent call last):\n  File "/srv/x.py", line 3, in f\nValueError: bad',
            "bad",
            "/srv/x.py",
        ),
        ("This model's maximum context length is 8192 tokens.", "8192 tokens", "\x00"),
    ],
)
def test_public_message_keeps_what_happened_and_drops_classes_and_addresses(
    text: str, kept: str, gone: str
) -> None:
    message = public_message(text)
    assert kept in message and gone not in message


def test_public_message_falls_back_when_nothing_is_left() -> None:
    assert public_message("ComputeAPIError") == "The request failed."
    assert public_message("", "The stream failed.") == "The stream failed."


def test_the_gateways_own_500_says_nothing_internal() -> None:
    from first_core.errors import internal_error_body

    assert internal_error_body()["error"]["message"] == (
        "The gateway hit an internal error. Please retry."
    )
    assert GatewayError("x").status == 500


def test_a_backend_failure_reaches_the_client_in_its_words() -> None:
    from first_core.inference.wait import backend_error

    failed = backend_error(502, "vLLM at http://10.0.0.5:8000/v1 failed: ConnectError: refused")
    assert failed.status == 502 and "10.0.0.5" not in failed.message
    assert "ConnectError" not in failed.message and failed.message.startswith("The model backend")
    refused = backend_error(400, "ValueError: max_tokens is too large")
    assert refused.status == 400 and refused.message == "max_tokens is too large"
