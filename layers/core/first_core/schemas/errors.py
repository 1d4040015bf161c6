"""Pydantic's validation errors in OpenAI's words: one `InvalidRequestError` naming the field the
way OpenAI does (`messages.0.content`), never with pydantic's own wording."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic_core import ErrorDetails

from first_core.errors import InvalidRequestError
from first_core.schemas._unions import _TAG

_PLURAL = re.compile(r"\b(\d+)( \w+)\(s\)")

# ---- pydantic errors to OpenAI errors -----------------------------------------------------------

_EXPECTED_TYPE = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}
_DETAIL = {
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "greater_than": "must be greater than {gt}",
    "less_than": "must be less than {lt}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must be at least {min_length} character(s) long",
    "string_too_long": "must be at most {max_length} character(s) long",
    "literal_error": "must be {expected}",
    "finite_number": "must be a finite number",
    "first_value": "{detail}",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "an integer" if isinstance(value, int) else "a decimal number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) > 40:
        value = value[:40] + "..."
    return json.dumps(value, ensure_ascii=False, default=str)


def _path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith(_TAG)))


def to_gateway_error(err: ErrorDetails) -> InvalidRequestError:
    """One pydantic error as the `InvalidRequestError` OpenAI would send for that mistake:
    the same wording for the same mistake on every route (bodies, batch lines, batches)."""
    kind, loc, got = err["type"], err["loc"], err["input"]
    # 2.0 reads as a float limit; the client sent or should send 2.
    ctx = {
        k: int(v) if isinstance(v, float) and v.is_integer() else v
        for k, v in (err.get("ctx") or {}).items()
    }

    if kind == "extra_forbidden":
        path = ".".join(filter(None, [_path(loc[:-1]), str(loc[-1])]))
        message = (
            f"Unrecognized request argument supplied: {path}"
            if len(loc) == 1
            else f"Unrecognized parameter: '{path}'."
        )
        return InvalidRequestError(message, param=path, code="unknown_parameter")

    # A dict key that fails is reported against the dict, naming the key in the message.
    bad_key = loc[-2] if len(loc) >= 2 and loc[-1] == "[key]" else None
    path = _path(loc[:-2] if bad_key is not None else loc)
    if ctx.get("at") is not None:
        path = f"{path}.{ctx['at']}" if path else str(ctx["at"])

    if kind.startswith("first_tag:"):  # the tag of a union is missing or unknown
        key = kind.partition(":")[2]
        if not isinstance(got, dict):
            kind = "model_type"
        elif got.get(key) is None:
            kind, path = "missing", f"{path}.{key}"
        else:
            kind, path, got = "literal_error", f"{path}.{key}", got[key]
            ctx = {"expected": err["msg"]}
    if kind == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{path}'.",
            param=path,
            code="missing_required_parameter",
        )
    if kind in _EXPECTED_TYPE or kind == "first_shape":
        expected = err["msg"] if kind == "first_shape" else _EXPECTED_TYPE[kind]
        return InvalidRequestError(
            f"Invalid type for '{path}': expected {expected}, but got {_json_type(got)}.",
            param=path,
            code="invalid_type",
        )

    detail = _DETAIL[kind].format(**ctx) if kind in _DETAIL else err["msg"].lower()
    if bad_key is not None:
        message = f"Invalid key in '{path}': {detail} (got {_show(bad_key)})."
    else:
        # Arrays and objects are not quoted back, only their size when that is the problem.
        if isinstance(got, list | dict):
            shown = f"{len(got)} item(s)" if kind in ("too_short", "too_long") else None
        elif isinstance(got, str) and kind.startswith("string_too"):
            shown = f"{len(got)} character(s)"
        else:
            shown = _show(got)
        message = f"Invalid value for '{path}': {detail}" + (f" (got {shown})." if shown else ".")
    plural = _PLURAL.sub(lambda m: m[1] + m[2] + ("" if m[1] == "1" else "s"), message)
    return InvalidRequestError(plural, param=path, code="invalid_value")
