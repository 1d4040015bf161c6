"""Bad input, fuzzed: every route of the running local stack, over HTTP, with hypothesis.

Properties, for every answer: no 5xx but the upstream ones (502/503/504), no stack trace or
server path in the body, and every refusal exactly OpenAI's error shape with a message.
Fuzzed inference uses `dave` (served, like alice) so the token budget the other contract
tests spend as alice is left alone; a few cases use no token or a garbage one.

The values include lone UTF-16 surrogates (sent as JSON `\\udXXX` escapes), extreme numbers
(huge integers, 1e308, -0, and the literals NaN, Infinity, 1e999 that Python's json reads), and
the headers bytes that are not UTF-8: such a header must be exactly a 400 `invalid_header`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from first_local.globus_standin import mint_token
from tests.contract.conftest import Stack

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
EMBEDDING_MODEL = "Salesforce/SFR-Embedding-Mistral"
UPSTREAM_STATUSES = {502, 503, 504}
LEAKS = ("Traceback", "/work/", "site-packages", 'File "')
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = settings(FUZZ, max_examples=60)

INFERENCE_PATHS = [
    f"{base}/{kind}"
    for base in ("/v1", "/resource_server/v1/sophia/vllm/v1")
    for kind in ("chat/completions", "completions", "embeddings")
]


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    # From a loopback address of its own: its made-up tokens count against that address's
    # failed-authentication limit, not against 127.0.0.1's, which the other tests share.
    transport = httpx.HTTPTransport(local_address="127.0.0.3")
    with httpx.Client(base_url=stack.base_url, timeout=30, transport=transport) as client:
        yield client


@pytest.fixture(scope="module")
def token() -> str:
    return mint_token("dave")


def assert_well_behaved(response: httpx.Response) -> None:
    status = response.status_code
    text = response.text
    where = f"{response.request.method} {response.request.url} -> {status}: {text[:300]!r}"
    assert status < 500 or status in UPSTREAM_STATUSES, where
    for leak in LEAKS:
        assert leak not in text, where
    if status >= 400:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, where
        error = body["error"]
        assert isinstance(error, dict), where
        assert set(error) == {"message", "type", "param", "code"}, where
        assert isinstance(error["message"], str) and error["message"].strip(), where
        assert isinstance(error["type"], str) and error["type"], where


# -- strategies -------------------------------------------------------------------------------

# A string starting with RAW is written into the JSON text as the literal after it (raw_body):
# numbers JSON cannot spell through json.dumps(allow_nan=False), but Python's json reads.
RAW = "\x00raw:"
raw_numbers = st.sampled_from(
    [
        "NaN",
        "Infinity",
        "-Infinity",
        "1e999",
        "-1e999",
        "-0",
        "-0.0",
        "1e308",
        "-1e308",
        "5e-324",
        "1" + "0" * 400,
        "-9223372036854775809",
        "18446744073709551616",
        "0e-999",
    ]
).map(lambda literal: RAW + literal)
# Lone surrogates (json.dumps writes them as `\udXXX` escapes), alone or inside text.
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
surrogate_text = st.builds(
    lambda before, lone, after: before + lone + after,
    st.text(max_size=8),
    surrogates,
    st.text(max_size=8),
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e308, -1e308, -0.0, 5e-324, 2**63, -(2**63) - 1, 10**30])
    | raw_numbers
    | st.text(max_size=40)
    | surrogate_text
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=12) | surrogate_text, children, max_size=5)
    ),
    max_leaves=25,
)
odd_values = st.one_of(
    json_values,
    st.just("x" * 200_000),  # huge string
    st.integers(min_value=2**63, max_value=2**80),
    st.just(-1),
    st.just(10**9),
    st.builds(lambda depth: json.loads("[" * depth + "]" * depth), st.integers(50, 400)),
)

NEAR_VALID: dict[str, dict[str, Any]] = {
    "chat/completions": {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    },
    "completions": {"model": MODEL, "prompt": "Once upon", "max_tokens": 4},
    "embeddings": {"model": EMBEDDING_MODEL, "input": ["protein folding"]},
}
FIELDS = [
    "model",
    "messages",
    "prompt",
    "input",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stop",
    "logprobs",
    "encoding_format",
    "stream_options",
    "tools",
]


@st.composite
def mutated_body(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    body = dict(NEAR_VALID[kind])
    action = draw(st.sampled_from(["set", "delete", "unknown"]))
    if action == "delete":
        body.pop(draw(st.sampled_from(sorted(body))), None)
    elif action == "unknown":
        body[draw(st.text(min_size=1, max_size=30))] = draw(json_values)
    else:
        field = draw(st.sampled_from(FIELDS))
        if field == "messages":
            # Mutate inside a message as well as the list itself.
            value = draw(
                odd_values
                | st.lists(
                    st.dictionaries(
                        st.sampled_from(["role", "content", "name", "tool_calls", "x"]),
                        odd_values,
                        max_size=3,
                    ),
                    max_size=3,
                )
            )
        else:
            value = draw(odd_values)
        body[field] = value
    return body


_RAW_LITERAL = re.compile(r'"\\u0000raw:([^"]*)"')


def raw_body(body: Any) -> bytes:
    """The JSON text (ASCII: a lone surrogate is a `\\udXXX` escape), with RAW literals put in."""
    return _RAW_LITERAL.sub(r"\1", json.dumps(body, allow_nan=False)).encode()


# Header value bytes h11 will send (visible ASCII and every byte from 0x80): most of them are not
# UTF-8 text.
header_bytes = st.lists(
    st.sampled_from([*range(0x21, 0x7F), *range(0x80, 0x100)]), min_size=1, max_size=24
).map(bytes)
odd_headers = st.lists(
    st.tuples(
        st.sampled_from(
            [b"x-odd", b"user-agent", b"accept", b"x-request-id", b"openai-organization"]
        ),
        header_bytes,
    ),
    max_size=2,
    unique_by=lambda header: header[0],
)


def is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return "\ufffd" not in value.decode("utf-8")


def send(
    http: httpx.Client,
    method: str,
    path: str,
    headers: dict[str, Any],
    extra: list[tuple[bytes, bytes]],
    **options: Any,
) -> httpx.Response:
    """The request with `extra` raw headers added; answered 400 `invalid_header` (on a route
    that exists) when one of them is not UTF-8 text."""
    raw = [
        (k.lower().encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()
    ]
    names = {name for name, _ in extra}
    raw = [(k, v) for k, v in raw if k not in names] + extra
    response = http.request(method, path, headers=raw, **options)
    if not all(is_utf8(value) for _, value in raw):
        # A route that does not exist is API Gateway's 404 before any function runs.
        expected = {(400, "invalid_header"), (404, "unknown_route")}
        answer = (response.status_code, response.json()["error"]["code"])
        assert answer in expected, response.text
    return response


broken_bytes = st.sampled_from(
    [
        b"",
        b"{",
        b"null",
        b"[]",
        b'{"model": ',
        b"\xff\xfe\xfd",
        b'{"model": "\xff\xfe"}',
        b'{"model": "a", "messages": [{"role": "user", "content": "\xc3\x28"}]}',
        b"NaN",
        b'{"max_tokens": NaN}',
        b'{"max_tokens": Infinity}',
        b'{"a": 1, "a": 2}',
        b"\x00" * 64,
        ("[" * 5000 + "]" * 5000).encode(),
        ('{"a":' * 3000 + "1" + "}" * 3000).encode(),
    ]
) | st.binary(max_size=300)
content_types = st.sampled_from(
    [
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/json; charset=latin-1",
        "",
    ]
)


# -- inference --------------------------------------------------------------------------------


@FUZZ
@given(
    path=st.sampled_from(INFERENCE_PATHS),
    data=st.data(),
    extra=odd_headers,
)
def test_inference_with_one_field_mutated(
    http: httpx.Client,
    token: str,
    path: str,
    data: st.DataObject,
    extra: list[tuple[bytes, bytes]],
) -> None:
    kind = path.rsplit("/v1/", 1)[1]
    body = data.draw(mutated_body(kind))
    response = send(
        http,
        "POST",
        path,
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        extra,
        content=raw_body(body),
    )
    assert_well_behaved(response)


@FUZZ
@given(
    path=st.sampled_from(INFERENCE_PATHS),
    body=json_values.map(raw_body) | broken_bytes,
    content_type=content_types,
    auth=st.sampled_from(["dave", "dave", "dave", "dave", "none", "garbage", "bob", "carol"]),
    extra=odd_headers,
)
def test_inference_with_any_body(
    http: httpx.Client,
    token: str,
    path: str,
    body: bytes,
    content_type: str,
    auth: str,
    extra: list[tuple[bytes, bytes]],
) -> None:
    headers: dict[str, Any] = {"Content-Type": content_type}
    if auth == "dave":
        headers["Authorization"] = f"Bearer {token}"
    elif auth == "garbage":
        headers["Authorization"] = "Bearer \u00e9\u00e9not-a-token".encode()  # not ASCII
    elif auth != "none":
        headers["Authorization"] = f"Bearer {mint_token(auth)}"
    assert_well_behaved(send(http, "POST", path, headers, extra, content=body))


# -- GET routes -------------------------------------------------------------------------------

segment = st.one_of(
    st.sampled_from(["sophia", "polaris", "vllm", "nowhere", "..", ".", "%", "req_"]),
    st.text(min_size=1, max_size=40),
).map(lambda s: quote(s, safe=""))
query = st.dictionaries(
    st.sampled_from(
        [
            "start_date",
            "end_date",
            "user",
            "x",
            "limit",
            "after",
            "order",
            "purpose",
            "status",
            "hours",
            "model",
            "cluster",
        ]
    ),
    st.one_of(
        st.text(max_size=30),
        st.sampled_from(
            [
                "all",
                "2026-01-01",
                "2026-13-45",
                "9999-12-31",
                "-1",
                "0000-00-00",
                "asc",
                "1e9",
                "0001-01-01",
                "0001-01-05",
                "9999-12-30",
                "2000-01-01",
                "2999-12-31",
            ]
        ),
    ),
    max_size=3,
).map(urlencode)
GET_ROUTES = [
    "/v1/models",
    "/resource_server/v1/{a}/{b}/v1/models",
    "/resource_server/v1/whoami",
    "/v1/usage",
    "/health",
    "/resource_server/v1/status",
    "/resource_server/v1/list-endpoints",
    "/resource_server/v1/{a}/jobs",
    "/v1/requests/{a}",
    "/{a}",
    "/v1/{a}",
    "/resource_server/v1/{a}/{b}/v1/{a}",
]
# Files and batches (issue 7): ids that exist for nobody, or are not ids at all.
OBJECT_ROUTES = [
    "/v1/files",
    "/v1/files/{a}",
    "/v1/files/{a}/content",
    "/v1/batches",
    "/v1/batches/{a}",
    "/resource_server/v1/batches",
    "/resource_server/v1/batches/{a}",
    "/resource_server/v1/batches/{a}/result",
]
GET_ROUTES += OBJECT_ROUTES
# The dashboard's JSON routes (issue 16); its sign-in pages answer a browser in HTML.
GET_ROUTES += [
    "/v1/requests",
    "/v1/admin/activity",
    "/v1/admin/requests",
    "/dashboard/session",
    "/dashboard/assets/{a}",
]


@FUZZ
@given(
    route=st.sampled_from(GET_ROUTES),
    a=segment,
    b=segment,
    qs=query,
    auth=st.sampled_from(["dave", "dave", "dave", "none", "garbage"]),
    extra=odd_headers,
)
def test_get_routes(
    http: httpx.Client,
    token: str,
    route: str,
    a: str,
    b: str,
    qs: str,
    auth: str,
    extra: list[tuple[bytes, bytes]],
) -> None:
    path = route.format(a=a, b=b) + (f"?{qs}" if qs else "")
    headers = {}
    if auth == "dave":
        headers["Authorization"] = f"Bearer {token}"
    elif auth == "garbage":
        headers["Authorization"] = "Basic Zm9vOmJhcg=="
    assert_well_behaved(send(http, "GET", path, headers, extra))


@FEW
@given(
    route=st.sampled_from(
        [
            *GET_ROUTES[:9],
            *OBJECT_ROUTES,
            "/v1/batches/{a}/cancel",
            "/resource_server/v1/{a}/{b}/v1/batches",
            "/callbacks/req_x",
            "/callbacks/req_x/stream",
            "/callbacks/batch_x/batch",
            *INFERENCE_PATHS,
        ]
    ),
    method=st.sampled_from(["PUT", "DELETE", "PATCH", "POST", "GET"]),
)
def test_wrong_methods(http: httpx.Client, token: str, route: str, method: str) -> None:
    path = route.format(a="sophia", b="vllm")
    response = http.request(
        method, path, headers={"Authorization": f"Bearer {token}"}, content=b"{}"
    )
    assert_well_behaved(response)


# -- callbacks --------------------------------------------------------------------------------


@FUZZ
@given(
    stream=st.sampled_from(["", "/stream", "/batch"]),
    request_id=st.one_of(st.just("req_" + "0" * 32), segment),
    authorization=st.one_of(
        st.none(),
        st.just("Bearer " + "0" * 64),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
    ),
    body=st.one_of(
        json_values.map(raw_body),
        broken_bytes,
        st.builds(
            lambda seq, rid: raw_body({"request_id": rid, "status_code": 200, "seq": seq}),
            st.integers(-5, 5),
            st.text(max_size=10),
        ),
    ),
    content_type=content_types,
)
def test_callbacks_with_random_tokens_and_bodies(
    http: httpx.Client,
    stream: str,
    request_id: str,
    authorization: str | None,
    body: bytes,
    content_type: str,
) -> None:
    headers = {"Content-Type": content_type}
    if authorization is not None and authorization.strip() == authorization:
        # (h11 refuses to send a header value with whitespace at either end)
        headers["Authorization"] = authorization
    path = f"/callbacks/{request_id}{stream}"
    response = http.post(path, content=body, headers=headers)
    assert_well_behaved(response)
    assert response.status_code >= 400  # nobody here holds a real callback token


# -- files and batches ------------------------------------------------------------------------

batch_bodies = st.fixed_dictionaries(
    {},
    optional={
        "input_file_id": st.one_of(st.sampled_from(["file-x", ""]), odd_values),
        "endpoint": st.one_of(
            st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/v1/responses"]),
            odd_values,
        ),
        "completion_window": st.one_of(st.sampled_from(["24h", "1h"]), odd_values),
        "metadata": st.one_of(
            st.dictionaries(st.text(max_size=80), st.text(), max_size=20), odd_values
        ),
        "input_file": odd_values,
        "model": st.one_of(st.just(MODEL), odd_values),
        "output_folder_path": odd_values,
    },
)


@FEW
@given(
    path=st.sampled_from(["/v1/batches", "/resource_server/v1/sophia/vllm/v1/batches"]),
    body=st.one_of(batch_bodies.map(raw_body), broken_bytes),
    content_type=content_types,
)
def test_batch_creation_with_any_body(
    http: httpx.Client, token: str, path: str, body: bytes, content_type: str
) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    response = http.post(path, content=body, headers=headers)
    assert_well_behaved(response)
    if response.status_code == 200 and path.startswith("/resource_server"):
        # A FIRST batch this fuzz made up: do not let it hold one of dave's slots.
        http.post(
            f"/v1/batches/{response.json()['batch_id']}/cancel",
            headers={"Authorization": f"Bearer {token}"},
        )


@FEW
@given(
    purpose=st.one_of(st.sampled_from(["batch", "fine-tune", ""]), st.text(max_size=20)),
    content=st.one_of(
        broken_bytes,
        st.lists(json_values.map(lambda v: raw_body(v).decode()), max_size=5).map(
            lambda lines: "\n".join(lines).encode()
        ),
    ),
    as_multipart=st.booleans(),
)
def test_file_upload_with_any_content(
    http: httpx.Client, token: str, purpose: str, content: bytes, as_multipart: bool
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    if as_multipart:
        response = http.post(
            "/v1/files",
            data={"purpose": purpose},
            files={"file": ("in.jsonl", content)},
            headers=headers,
        )
    else:
        response = http.post(
            "/v1/files", content=content, headers={**headers, "Content-Type": "multipart/form-data"}
        )
    assert_well_behaved(response)
    assert response.status_code != 200 or response.json()["object"] == "file"
