"""vLLM's own parameters through the gateway (the mock vLLM answers `[mock:received]` with the body
it received), `GET /v1/models/{id}`, and a cancelled stream billed its prompt, with the real
`openai` package against the local stack."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from first_local.globus_standin import mint_token
from first_local.mock_vllm import count_prompt_tokens
from tests.contract.conftest import Stack
from tests.support.contract import usage_rows, wait_until_ended

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
BIG_MODEL = "meta-llama/Meta-Llama-3.1-70B-Instruct"  # served by sophia only
EMBEDDING_MODEL = "Salesforce/SFR-Embedding-Mistral"
ECHO = [{"role": "user", "content": "What did vLLM get? [mock:received]"}]

SAMPLING = {
    "top_k": 40,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "length_penalty": 1.0,
    "stop_token_ids": [128009],
    "include_stop_str_in_output": False,
    "ignore_eos": False,
    "min_tokens": 1,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "truncate_prompt_tokens": 4096,
    "prompt_logprobs": 0,
    "allowed_token_ids": [1, 2, 3],
    "bad_words": ["forbidden"],
    "use_beam_search": False,
}
STRUCTURED = {
    "guided_json": {"type": "object", "properties": {"answer": {"type": "string"}}},
    "guided_decoding_backend": "xgrammar",
    "guided_whitespace_pattern": " ",
    "structured_outputs": {"json": {"type": "object"}},
}
CHAT_TEMPLATE = {
    "chat_template_kwargs": {"enable_thinking": False},
    "add_generation_prompt": True,
    "continue_final_message": False,
    "documents": [{"title": "note", "text": "ünïcode ✓ stays as sent"}],
    "mm_processor_kwargs": {"num_crops": 4},
}
SCHEDULING = {
    "priority": -5,
    "request_id": "my-own-id",
    "cache_salt": "a-salt-of-my-own",
    "vllm_xargs": {"my_extension": 1, "label": "x", "scale": 0.5},
    "kv_transfer_params": {"do_remote_decode": False},
    "return_tokens_as_token_ids": False,
    "return_token_ids": False,
}


def _received(text: str) -> dict[str, Any]:
    answer = json.loads(text)
    assert isinstance(answer, dict)
    return answer


@pytest.mark.parametrize(("federated", "cluster"), [(True, "sophia"), (False, "polaris")])
def test_chat_extras_reach_vllm_unchanged(stack: Stack, federated: bool, cluster: str) -> None:
    extras = {**SAMPLING, **STRUCTURED, **CHAT_TEMPLATE, **SCHEDULING}
    client = stack.client(federated=federated, cluster=cluster)
    reply = client.chat.completions.create(
        model=MODEL, messages=ECHO, max_tokens=2000, temperature=0.7, extra_body=extras
    )
    received = _received(reply.choices[0].message.content or "")
    # Every extra as the SDK sent it, byte for byte once re-encoded (key order aside).
    assert {k: received[k] for k in extras} == extras
    sent = json.dumps(extras, sort_keys=True, ensure_ascii=False)
    assert json.dumps({k: received[k] for k in extras}, sort_keys=True, ensure_ascii=False) == sent
    assert received["temperature"] == 0.7 and received["max_tokens"] == 2000


def test_completion_and_embedding_extras_reach_vllm(stack: Stack) -> None:
    client = stack.client()
    extras = {**SAMPLING, **SCHEDULING, "echo": False, "add_special_tokens": True}
    extras["guided_regex"] = "[a-z ]+"
    reply = client.completions.create(
        model=MODEL, prompt="Say [mock:received]", max_tokens=3000, extra_body=extras
    )
    received = _received(reply.choices[0].text)
    assert {k: received[k] for k in extras} == extras
    # Embeddings: vLLM's pooling options are accepted (vLLM answers embeddings as usual).
    vectors = client.embeddings.create(
        model=EMBEDDING_MODEL,
        input="x",
        extra_body={"truncate_prompt_tokens": -1, "normalize": True, "priority": 1},
    )
    assert vectors.data and vectors.usage.prompt_tokens > 0


def test_a_streamed_request_carries_the_extras_too(stack: Stack) -> None:
    stream = stack.client().chat.completions.create(
        model=MODEL, messages=ECHO, stream=True, extra_body={"top_k": 3, "min_p": 0.2}
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    received = _received(text)
    assert (received["top_k"], received["min_p"], received["stream"]) == (3, 0.2, True)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"priority": "urgent"}, "priority"),
        ({"guided_choice": []}, "guided_choice"),
        ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs"),
    ],
)
def test_a_bad_vllm_value_is_a_400_naming_the_param(
    stack: Stack, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        stack.client().chat.completions.create(model=MODEL, messages=ECHO, extra_body=extra)
    error = raised.value.body
    assert isinstance(error, dict)
    assert error["param"] == param and param in error["message"]
    assert raised.value.status_code == 400


def test_unknown_keys_are_still_refused_naming_them(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        stack.client().chat.completions.create(
            model=MODEL, messages=ECHO, extra_body={"top_kk": 3}
        )
    error = raised.value.body
    assert isinstance(error, dict) and error["param"] == "top_kk"
    assert "Unrecognized request argument supplied: top_kk" in error["message"]
    # OpenAI's own parameters keep OpenAI's ranges.
    with pytest.raises(openai.BadRequestError) as raised:
        stack.client().chat.completions.create(model=MODEL, messages=ECHO, temperature=2.5)
    assert isinstance(raised.value.body, dict) and raised.value.body["param"] == "temperature"


def test_the_max_tokens_cap_still_holds_with_extras(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        stack.client().chat.completions.create(
            model=MODEL, messages=ECHO, max_tokens=100_000, extra_body={"min_tokens": 1}
        )
    assert isinstance(raised.value.body, dict) and raised.value.body["param"] == "max_tokens"


# ---- GET /v1/models/{id} -------------------------------------------------------------------------


@pytest.mark.parametrize(("federated", "cluster"), [(True, "sophia"), (False, "polaris")])
def test_models_retrieve_answers_the_list_entry(
    stack: Stack, federated: bool, cluster: str
) -> None:
    client = stack.client(federated=federated, cluster=cluster)
    model = client.models.retrieve(MODEL)  # the SDK sends the slash as %2F
    listed = next(m for m in client.models.list() if m.id == MODEL)
    assert model.id == MODEL and model.object == "model"
    assert model.model_dump() == listed.model_dump()
    # Unescaped, as curl and older SDKs send it.
    base = str(client.base_url).rstrip("/")
    response = httpx.get(
        f"{base}/models/{MODEL}", headers={"Authorization": f"Bearer {mint_token('alice')}"}
    )
    assert response.status_code == 200
    assert response.json() == listed.model_dump(exclude_unset=True)


@pytest.mark.parametrize(
    ("federated", "cluster", "model"),
    [
        (True, "sophia", "acme/No-Such-Model"),
        (True, "sophia", "gpt-17"),
        (False, "polaris", BIG_MODEL),  # not served there: not the caller's to use there
    ],
)
def test_models_retrieve_of_a_model_one_may_not_use_is_openais_404(
    stack: Stack, federated: bool, cluster: str, model: str
) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        stack.client(federated=federated, cluster=cluster).models.retrieve(model)
    assert raised.value.body == {
        "message": f"The model '{model}' does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_models_retrieve_for_a_user_refused_everywhere_is_403_as_the_list(stack: Stack) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        stack.client("bob").models.retrieve(MODEL)


# ---- a cancelled stream is billed its prompt -----------------------------------------------------


def test_a_cancelled_stream_counts_its_prompt_tokens(stack: Stack) -> None:
    text = "a long one for billing [mock:tokens=400] [mock:rate=40]"
    raw = stack.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": text}], stream=True
    )
    request_id = raw.headers["x-first-request-id"]
    stream = raw.parse()
    for seen, _ in enumerate(stream):
        if seen >= 4:
            break
    stream.close()
    deadline = time.monotonic() + 15
    while True:
        record = wait_until_ended(stack, request_id)
        if "completion_tokens" in record or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert record["status"] == "cancelled"
    prompt = count_prompt_tokens(text)
    assert int(record["prompt_tokens"]) == prompt > 0
    assert 4 <= int(record["completion_tokens"]) < 100
    assert int(record["total_tokens"]) == prompt + int(record["completion_tokens"])
    deadline = time.monotonic() + 10
    while not (rows := usage_rows(stack, request_id)) or "prompt_tokens" not in rows[0]:
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
    assert len(rows) == 1 and int(rows[0]["prompt_tokens"]) == prompt
