"""Fuzz the gateway's edge with OpenAI's own OpenAPI description (schemathesis over the real
`moeflow up` with a tiny llama engine).

Bodies are generated from the official schemas of the five operations we serve (chat,
completions, responses, the two model reads), with `model`
set to the served model and `max_tokens` kept small. After every case: no 5xx, every error is
the OpenAI envelope, every success parses as our typed response and every JSON answer fits
the description's own response schema (one documented exception: ``_as_published``). Every
few cases: a greedy
canary still answers what transformers answers, and /health is ok. Deterministic (derandomized
Hypothesis, no example database) and bounded (a fixed number of examples, no shrinking).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter

from moeflow.gateway.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ErrorEnvelope,
    Model,
    ModelList,
)
from moeflow.gateway.responses_protocol import Response, ResponseStreamEvent
from moeflow.text.tokenizer import TextTokenizer
from tests.integration.gateway.openai_spec import served_openapi
from tests.platform_process import Platform
from tests.reference import hf_chat_ids, hf_greedy

MODEL = "tiny"
MAX_EXAMPLES = 500  # about 20 s on an idle 2-core machine, under 60 s on a busy one
CHECK_EVERY = 25
MAX_TOKENS = 4
CANARY = [{"role": "user", "content": "Tell me about the river and the town."}]
CANARY_TOKENS = 8

# (operation, refused body fields, the param the 400 must name)
REFUSED = [
    ("chat/completions", {"n": 17}, "n"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("chat/completions", {"tools": [{"type": "function", "function": {}}]}, "tools.0"),
    ("chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("chat/completions", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("chat/completions", {"logit_bias": {"99999999": 3}}, "logit_bias"),
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}}]}]},
     "messages.0.content"),
    ("completions", {"min_tokens": 99, "max_tokens": 4}, "min_tokens"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"n": 17}, "n"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"frequency_penalty": 2.5}, "frequency_penalty"),
]


def _typed(label: str, status: int) -> type[BaseModel] | None:
    return {
        "POST /chat/completions": ChatCompletion,
        "POST /completions": Completion,
        "POST /responses": Response,
        "GET /models": ModelList,
        "GET /models/{model}": Model,
    }.get(label) if status == 200 else None


def _chunk_type(label: str) -> type[BaseModel]:
    return ChatCompletionChunk if label == "POST /chat/completions" else CompletionChunk


def _check_answer(label: str, body: Any, status: int, content_type: str, content: bytes) -> None:
    """No 5xx; errors in the envelope; successes parse as our typed responses."""
    text = content.decode("utf-8")
    where = f"{label} {json.dumps(body, default=str)[:600]!s} -> {status}: {text[:600]}"
    assert status < 500, where
    if status >= 400:
        ErrorEnvelope.model_validate_json(text)
        return
    assert status == 200, where
    if content_type.startswith("text/event-stream") and label == "POST /responses":
        # the Responses events: `event: <type>` and `data: <event>`, no [DONE]
        datas = [line.removeprefix("data: ") for line in text.splitlines()
                 if line.startswith("data: ")]
        kinds = [TypeAdapter(ResponseStreamEvent).validate_json(d).type for d in datas]
        assert kinds and kinds[-1] in ("response.completed", "response.incomplete",
                                       "error"), where
        return
    if content_type.startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
        assert events[-1] == "[DONE]", where
        for data in events[:-1]:
            parsed = json.loads(data)
            if "error" in parsed:  # a failure after the 200 went out is still an envelope
                ErrorEnvelope.model_validate(parsed)
            else:
                _chunk_type(label).model_validate(parsed)
        return
    typed = _typed(label, status)
    assert typed is not None, where
    typed.model_validate_json(text)


def _as_published(label: str, data: Any) -> Any:
    """The one place our answers knowingly differ from the published schema: with ``echo``,
    a completion's first prompt token has no logprob, so it is null (as OpenAI's API and
    vLLM answer, and lm-evaluation-harness expects), while the schema types every entry as a
    number. Anything else must fit as it is."""
    if label != "POST /completions" or not isinstance(data, dict):
        return data
    for choice in data.get("choices") or []:
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        if logprobs and logprobs.get("token_logprobs") and logprobs["token_logprobs"][0] is None:
            logprobs["token_logprobs"][0] = 0.0
            logprobs["top_logprobs"][0] = {}
    return data


def _check_conformance(case: Any, answer: Any) -> None:
    """The answer fits OpenAI's own response schema for its status (schemathesis's check).
    Streams are checked against our typed events in ``_check_answer``: the description
    gives them no schema."""
    if not answer.headers.get("content-type", [""])[0].startswith("application/json"):
        return
    published = json.dumps(_as_published(case.operation.label, json.loads(answer.content)))
    case.operation.validate_response(type(answer)(
        status_code=answer.status_code, headers=answer.headers,
        content=published.encode(), request=answer.request, elapsed=answer.elapsed,
        verify=answer.verify))


def _string_leaves(body: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of the string values in a JSON document, in document order."""
    if isinstance(body, str):
        return [path]
    if isinstance(body, dict):
        return [p for k, v in body.items() for p in _string_leaves(v, (*path, str(k)))]
    if isinstance(body, list):
        return [p for i, v in enumerate(body) for p in _string_leaves(v, (*path, str(i)))]
    return []


def _poison(body: Any, path: tuple[str, ...]) -> Any:
    """A copy of ``body`` whose string at ``path`` ends in a lone UTF-16 surrogate."""
    if not path:
        return f"{body}\ud800"
    head, rest = path[0], path[1:]
    if isinstance(body, list):
        return [_poison(v, rest) if str(i) == head else v for i, v in enumerate(body)]
    return {k: _poison(v, rest) if k == head else v for k, v in body.items()}


def _bounded(body: Any) -> Any:
    """The generated body, aimed at the served model with a small token budget."""
    if not isinstance(body, dict):
        return body
    body = {**body, "model": MODEL}
    if "input" in body:  # a Responses request
        if not isinstance(body.get("max_output_tokens"), int) \
                or body["max_output_tokens"] > MAX_TOKENS:
            body["max_output_tokens"] = MAX_TOKENS
        return body
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int) and body[name] > MAX_TOKENS:
            body[name] = MAX_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS
    return body


@pytest.fixture(scope="module")
def canary_text(tiny_dirs: dict[str, Path]) -> str:
    model_dir = tiny_dirs["llama"]
    expected = hf_greedy(model_dir, hf_chat_ids(model_dir, CANARY), CANARY_TOKENS)
    return TextTokenizer.from_dir(model_dir).decode(expected)


def _assert_still_serving(platform: Platform, canary_text: str) -> None:
    r = httpx.post(f"{platform.base_url}/chat/completions", timeout=30, json={
        "model": MODEL, "messages": CANARY, "max_tokens": CANARY_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == canary_text
    health = httpx.get(f"{platform.root_url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text


@pytest.mark.parametrize(("endpoint", "fields", "param"), REFUSED)
def test_refused_features_get_400_in_the_envelope(
    platform: Platform, endpoint: str, fields: dict[str, Any], param: str
) -> None:
    base: dict[str, Any] = (
        {"model": MODEL, "messages": CANARY, "max_tokens": 2} if endpoint.startswith("chat")
        else {"model": MODEL, "prompt": "the river", "max_tokens": 2}
    )
    r = httpx.post(f"{platform.base_url}/{endpoint}", json={**base, **fields}, timeout=30)
    assert r.status_code == 400, r.text
    error = ErrorEnvelope.model_validate(r.json()).error
    assert error.type == "invalid_request_error"
    assert error.param == param, error


def test_schemathesis_over_openais_description_finds_no_5xx_and_answers_conform(
    platform: Platform, canary_text: str
) -> None:
    schema = schemathesis.openapi.from_dict(served_openapi())
    strategy = schema.as_strategy()
    _assert_still_serving(platform, canary_text)
    session = requests.Session()
    seen: dict[str, int] = {}

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy, data=st.data())
    def one_case(case: Any, data: st.DataObject) -> None:
        case.body = _bounded(case.body)
        label = case.operation.label
        # now and then, one string anywhere in the body carries a lone surrogate
        leaves = _string_leaves(case.body)
        poisoned = leaves[data.draw(st.integers(0, len(leaves) - 1))] if leaves and data.draw(
            st.sampled_from(["as generated"] * 3 + ["poisoned"])) == "poisoned" else None
        if poisoned is None:
            answer = case.call(base_url=platform.base_url, session=session, timeout=30)
            status, content = answer.status_code, answer.content
            content_type = answer.headers.get("content-type", [""])[0]
            if status < 500:
                _check_conformance(case, answer)
        else:
            # schemathesis encodes bodies as UTF-8, which a lone surrogate cannot be; JSON can
            body = _poison(case.body, poisoned)
            raw = session.request(case.method, f"{platform.base_url}{case.formatted_path}",
                                  data=json.dumps(body), timeout=30,
                                  headers={"content-type": "application/json"})
            status, content = raw.status_code, raw.content
            content_type = raw.headers.get("content-type", "")
            error = ErrorEnvelope.model_validate_json(content).error
            assert status == 400 and error.param == (".".join(poisoned) or None), (body, error)
            label += " (lone surrogate)"
        _check_answer(label, case.body, status, content_type, content)
        key = f"{label} {status}"
        seen[key] = seen.get(key, 0) + 1
        if sum(seen.values()) % CHECK_EVERY == 0:
            _assert_still_serving(platform, canary_text)

    one_case()
    _assert_still_serving(platform, canary_text)
    num_cases = sum(seen.values())
    assert num_cases >= MAX_EXAMPLES * 9 // 10, seen
    # the generated bodies reached the engine too, not only the validator
    served = seen.get("POST /chat/completions 200", 0) + seen.get("POST /completions 200", 0)
    assert served > 0, seen
    # Generated Responses bodies are valid only by luck (the schema's unions are wide), so
    # one valid request, streamed and not, is always checked the same way.
    for stream in (False, True):
        case = schema["/responses"]["POST"].Case(body={
            "model": MODEL, "input": "Tell me a story.", "max_output_tokens": MAX_TOKENS,
            "stream": stream})
        answer = case.call(base_url=platform.base_url, session=session, timeout=30)
        _check_conformance(case, answer)
        _check_answer("POST /responses", case.body, answer.status_code,
                      answer.headers.get("content-type", [""])[0], answer.content)
        assert answer.status_code == 200, answer.content
