"""The gateway's edge without an engine: request bodies (invalid Unicode anywhere, null as the
default), the error envelope for bodies that are not JSON, typed responses on the wire and in
/openapi.json, through the real app (httpx ASGI) where the answer comes from the edge alone."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from moeflow.gateway.app import build_app
from moeflow.gateway.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    CompletionRequest,
    find_lone_surrogate,
    make_usage,
)
from moeflow.gateway.settings import GatewaySettings
from moeflow.gateway.streaming import sse_event
from moeflow.web.errors import validation_error_body

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def client() -> httpx.AsyncClient:
    app = build_app(GatewaySettings(max_body_bytes=4096))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


# -- lone surrogates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "messages": [{"role": "user", "content": "a\ud800"}]}, "messages.0.content"),
        ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
         "messages.0.content.0.text"),
        ({**CHAT, "messages": [{"role": "user", "content": "x", "name": "\ud83d"}]},
         "messages.0.name"),
        ({**CHAT, "stop": "\ud800"}, "stop"),
        ({**CHAT, "stop": ["ok", "\ud800"]}, "stop.1"),
        ({**CHAT, "user": "\udc00"}, "user"),
        ({**CHAT, "model": "\ud800"}, "model"),
        ({**CHAT, "tools": [{"type": "function", "function": {"name": "\ud800"}}]},
         "tools.0.function.name"),
        ({**CHAT, "metadata": {"k": ["\ud800"]}}, "metadata.k.0"),
        ({**CHAT, "nested": {"\ud800": 1}}, "nested"),
    ],
)
def test_a_lone_surrogate_anywhere_in_a_chat_body_names_its_param(
    body: dict[str, Any], param: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate(body)
    envelope = validation_error_body(raised.value.errors())
    assert envelope["error"]["param"] == param
    assert envelope["error"]["code"] == "invalid_request"
    assert "lone UTF-16 surrogate" in str(envelope["error"]["message"])


@pytest.mark.parametrize(
    ("prompt", "param"), [("\ud800", "prompt"), (["fine", "bad\udc00"], "prompt.1")]
)
def test_a_lone_surrogate_in_a_completions_prompt_names_its_param(
    prompt: object, param: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    assert validation_error_body(raised.value.errors())["error"]["param"] == param


def test_valid_unicode_passes_including_astral_characters_and_surrogate_pairs() -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "emoji \U0001f600 and é"}],
            "stop": ["\U0001f600"]}
    assert find_lone_surrogate(body) is None
    assert ChatCompletionRequest.model_validate(body).stop == ["\U0001f600"]


def test_the_walk_survives_nesting_deeper_than_the_interpreter_stack() -> None:
    deep: Any = "\ud800"
    for _ in range(5000):
        deep = [deep]
    found = find_lone_surrogate({"x": deep})
    assert found is not None and found[0] == "x" + ".0" * 5000


# -- null means the default -----------------------------------------------------------------------


def test_null_for_optional_fields_means_their_default() -> None:
    chat = ChatCompletionRequest.model_validate({
        **CHAT, "n": None, "stream": None, "stream_options": {"include_usage": None},
        "ignore_eos": None, "temperature": None, "stop": None, "logprobs": None,
        "logit_bias": None, "response_format": None, "tools": None, "user": None,
    })
    assert (chat.n, chat.stream, chat.ignore_eos) == (1, False, False)
    assert chat.stream_options is not None and chat.stream_options.include_usage is False
    completion = CompletionRequest.model_validate(
        {"model": "m", "prompt": "x", "echo": None, "best_of": None, "n": None})
    assert (completion.echo, completion.n, completion.best_of) == (False, 1, None)


def test_null_for_a_required_field_is_still_refused() -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**CHAT, "messages": None})


# -- bodies that are not JSON ---------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b'{"model": "m", "messages": [', b"{not json", b'{"a": 1} x'])
async def test_a_body_that_is_not_json_says_so_with_no_param(raw: bytes) -> None:
    async with client() as c:
        r = await c.post("/v1/chat/completions", content=raw,
                         headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] is None
    assert error["message"].startswith("the request body is not valid JSON")
    assert "character" in error["message"]


async def test_a_body_that_is_not_utf8_is_a_clear_400() -> None:
    async with client() as c:
        r = await c.post("/v1/completions", content=b'{"prompt": "\xff"}',
                         headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "the request body could not be read as JSON text (UTF-8)",
        "type": "invalid_request_error", "param": None, "code": "invalid_request",
    }


def test_union_member_names_never_reach_the_param() -> None:
    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate({**CHAT, "stop": 5})
    assert validation_error_body(raised.value.errors())["error"]["param"] == "stop"


def test_a_non_text_content_part_is_refused_by_name() -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}
    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate(body)
    error = validation_error_body(raised.value.errors())["error"]
    assert error["param"] == "messages.0.content"
    assert "input_audio" in str(error["message"]) and "more problems" not in str(error["message"])


# -- typed responses ------------------------------------------------------------------------------


def test_chunks_keep_the_openai_wire_shape() -> None:
    base = {"id": "c", "created": 1, "model": "m"}
    first = ChatCompletionChunk(
        **base, choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
    last = ChatCompletionChunk(**base, choices=[ChatChunkChoice(delta=ChatDelta(),
                                                                finish_reason="stop")])
    assert sse_event(first, exclude={"usage"}) == (
        'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
        '[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
        '"finish_reason":null}]}\n\n')
    assert json.loads(sse_event(last).removeprefix("data: "))["choices"][0]["delta"] == {}
    assert json.loads(sse_event(last).removeprefix("data: "))["usage"] is None
    usage = ChatCompletionChunk(**base, choices=[], usage=make_usage(3, 2, 1))
    assert json.loads(sse_event(usage).removeprefix("data: "))["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 1}}


def test_sse_data_is_ascii_so_line_separators_never_travel_raw() -> None:
    chunk = ChatCompletionChunk(id="c", created=1, model="m", choices=[
        ChatChunkChoice(delta=ChatDelta(content="a\u2028b\x85c\n"))])
    assert sse_event(chunk).isascii()


def test_openapi_documents_the_typed_bodies_and_no_422() -> None:
    spec = build_app(GatewaySettings()).openapi()
    schemas = spec["components"]["schemas"]
    for name in ("ChatCompletion", "Completion", "ModelList", "Model", "Usage", "ErrorEnvelope",
                 "ChatCompletionRequest", "CompletionRequest"):
        assert name in schemas, name
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert chat["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletion"}
    stream = chat["200"]["content"]["text/event-stream"]["schema"]
    assert stream["title"] == "ChatCompletionChunk" and "$defs" not in json.dumps(stream)
    assert "422" not in chat and chat["4XX"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorEnvelope"}
