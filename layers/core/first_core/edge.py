"""What both HTTP entry points (the inference proxy and the control plane) check of the bytes a
client sends before anything reads them, and the headers every answer of theirs carries.

- Header values must be UTF-8 text: a byte that is not (0xff, a broken sequence) is a 400 in
  OpenAI's shape on every route, instead of whatever each framework does with it (the control
  plane's decode raised a 500). A value that reaches us already decoded (the control plane on
  AWS gets strings from API Gateway; the local server decodes as it would) shows its bad bytes
  as U+FFFD or as lone surrogates, and is refused the same.
- JSON bodies may not hold a lone UTF-16 surrogate (`"\\ud800"`): Python's `json` accepts the
  escape, but the string cannot be encoded as UTF-8 again, so it would fail far from here (in
  DynamoDB, in the answer, on the cluster). It is a 400 where the body is read.
- `SECURITY_HEADERS` go on every answer: a browser must not guess a JSON error's type as HTML
  (`nosniff`), and no cache may keep an answer meant for one token holder (`no-store`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from first_core.errors import InvalidRequestError

SECURITY_HEADERS: dict[str, str] = {
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}

# Where bytes were not UTF-8, a decoder leaves U+FFFD ("replace") or a lone surrogate
# ("surrogateescape"); neither is text a client meant to send in a header.
_UNDECODED = re.compile("[\ufffd\ud800-\udfff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Only a `\ud800` to `\udfff` escape can make a lone surrogate (raw UTF-8 cannot encode one):
# bodies without such an escape, nearly all, skip the walk through the parsed value.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def check_headers(headers: Iterable[tuple[bytes | str, bytes | str]]) -> None:
    """400 `invalid_header` if a header's name or value is not UTF-8 text."""
    for name, value in headers:
        if not (_is_text(name) and _is_text(value)):
            shown = name.decode("latin-1") if isinstance(name, bytes) else name
            raise InvalidRequestError(
                f"The value of the header '{_printable(shown)}' is not valid UTF-8 text.",
                code="invalid_header",
            )


def _is_text(value: bytes | str) -> bool:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return False
    return _UNDECODED.search(value) is None


def _printable(name: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in name)[:100]


def load_json(raw: bytes | str) -> Any:
    """The parsed JSON body; 400 `invalid_json` if it is not JSON, `invalid_unicode` if a string
    (a key or a value, at any depth) holds a lone surrogate."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError too: bytes that are not UTF-8
        raise InvalidRequestError(
            "The request body is not valid JSON.", code="invalid_json"
        ) from None
    check_unicode(data, raw)
    return data


def check_unicode(data: Any, raw: bytes | str | None = None) -> None:
    """400 `invalid_unicode` if a string in `data` holds a lone surrogate (`raw`, the text it
    was parsed from, lets a body without a surrogate escape skip the walk)."""
    if raw is not None:
        as_bytes = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
        if _SURROGATE_ESCAPE.search(as_bytes) is None:
            return
    if _has_lone_surrogate(data):
        raise InvalidRequestError(
            "The request body holds a string with a lone UTF-16 surrogate (\\ud800-\\udfff), "
            "which is not valid Unicode.",
            code="invalid_unicode",
        )


def _has_lone_surrogate(data: Any) -> bool:
    # Iterative, so a deeply nested body cannot exhaust the stack here.
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                return True
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False
