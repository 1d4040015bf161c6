"""What every request schema is built of: strict models, and unions discriminated by a function
that looks at the raw JSON value (so a wrong value yields one error, on the branch the client
meant). Branches carry tags starting with `_TAG`, dropped again when an error becomes a `param`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Discriminator
from pydantic_core import PydanticCustomError

_TAG = "§"
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOKEN_ID = re.compile(r"[0-9]+")


def _invalid(detail: str, at: str | int | None = None) -> PydanticCustomError:
    # `at` extends the error location, for checks that run on a whole object or list.
    return PydanticCustomError("first_value", "{detail}", {"detail": detail, "at": at})


def _shape(value: Any) -> str | None:
    if isinstance(value, list):
        first = value[0] if value else None
        if isinstance(first, list):
            return _TAG + "token-arrays"
        if isinstance(first, int) and not isinstance(first, bool):
            return _TAG + "tokens"
        return _TAG + "array"
    if isinstance(value, str):
        return _TAG + "string"
    return _TAG + "object" if isinstance(value, dict) else None


def _by_shape(expected: str) -> Discriminator:
    # No custom_error_context: it would make the Annotated metadata unhashable for Union.
    return Discriminator(_shape, custom_error_type="first_shape", custom_error_message=expected)


def _by_key(key: str, *choices: str) -> Discriminator:
    def choose(value: Any) -> str | None:
        tag = value.get(key) if isinstance(value, dict) else None
        return _TAG + tag if isinstance(tag, str) and tag in choices else None

    expected = "one of " + ", ".join(f"'{c}'" for c in choices)
    return Discriminator(
        choose, custom_error_type="first_tag:" + key, custom_error_message=expected
    )


def _function_name(name: str) -> str:
    if not _FUNCTION_NAME.fullmatch(name):
        raise _invalid("must be 1 to 64 characters among a-z, A-Z, 0-9, '_' and '-'")
    return name


def _token_id_key(key: str) -> str:
    if not _TOKEN_ID.fullmatch(key):
        raise _invalid("keys must be token ids (non-negative integers)")
    return key


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
