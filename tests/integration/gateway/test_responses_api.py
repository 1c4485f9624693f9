"""POST /v1/responses through the official `openai` client (tiny llama): text in and out,
instructions, max_output_tokens, streaming events, text.format, function tools, and the
stateless refusal of previous_response_id."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from pydantic import TypeAdapter

from moeflow.gateway.responses_protocol import Response, ResponseStreamEvent
from moeflow.text.tokenizer import TextTokenizer
from tests.platform_process import Platform, start_platform
from tests.reference import hf_chat_ids, hf_greedy

MODEL = "tiny"


@pytest.fixture(scope="module")
def roomy(tiny_dirs: dict[str, Path]) -> Iterator[Platform]:
    """Room for the tools' system message (the tiny vocabulary makes text long)."""
    p = start_platform(tiny_dirs["llama"],
                       ["--served-model-name", MODEL, "--max-model-len", "1536"])
    yield p
    assert p.stop() == 0, p.log()[-3000:]


def client(platform: Platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform.base_url, api_key="x", max_retries=0)


def test_text_response_equals_the_chat_answer(platform: Platform,
                                              tiny_dirs: dict[str, Path]) -> None:
    model_dir = tiny_dirs["llama"]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tell me about the river."}]
    expected = TextTokenizer.from_dir(model_dir).decode(
        hf_greedy(model_dir, hf_chat_ids(model_dir, messages), 6))
    r = client(platform).responses.create(model=MODEL, instructions="Be brief.",
                                          input="Tell me about the river.",
                                          max_output_tokens=6, temperature=0)
    assert r.output_text == expected
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.usage is not None and r.usage.output_tokens == 6
    assert r.output[0].type == "message"
    # streamed: the documented event sequence, and the same text
    events = list(client(platform).responses.create(
        model=MODEL, instructions="Be brief.", input="Tell me about the river.",
        max_output_tokens=6, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_text_format_tools_and_refusals(roomy: Platform) -> None:
    c = client(roomy)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"], "additionalProperties": False}
    r = c.responses.create(model=MODEL, input=[{"role": "user", "content": "ok?"}],
                           max_output_tokens=20, text={"format": {
                               "type": "json_schema", "name": "s", "schema": schema,
                               "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    tool = {"type": "function", "name": "ping",
            "parameters": {"type": "object", "properties": {"n": {"enum": [1, 2]}},
                           "required": ["n"], "additionalProperties": False}}
    called = c.responses.create(model=MODEL, input="ping", tools=[tool],  # type: ignore[list-item]
                                tool_choice="required", max_output_tokens=40,
                                parallel_tool_calls=False)
    calls = [o for o in called.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "ping"
    assert json.loads(calls[0].arguments)["n"] in (1, 2)
    # the call and its output go back as input items
    follow = c.responses.create(model=MODEL, tools=[tool], max_output_tokens=4,  # type: ignore[list-item]
                                input=[{"role": "user", "content": "ping"},
                                       {"type": "function_call", "call_id": calls[0].call_id,
                                        "name": "ping", "arguments": calls[0].arguments},
                                       {"type": "function_call_output",
                                        "call_id": calls[0].call_id, "output": "pong"}])
    assert follow.status in ("completed", "incomplete")
    with pytest.raises(openai.BadRequestError) as stateful:
        c.responses.create(model=MODEL, input="x", previous_response_id="resp_1")
    assert stateful.value.param == "previous_response_id"


def test_streamed_function_call_and_typed_schema(roomy: Platform) -> None:
    """A forced call streams as its item, then argument fragments; every event parses as the
    typed events the OpenAPI description lists, and the JSON answer as its Response."""
    tool = {"type": "function", "name": "ping",
            "parameters": {"type": "object", "properties": {"word": {"type": "string",
                                                                      "maxLength": 8}},
                           "required": ["word"], "additionalProperties": False}}
    c = client(roomy)
    events = list(c.responses.create(model=MODEL, input="ping", tools=[tool],  # type: ignore[list-item]
                                     tool_choice="required", parallel_tool_calls=False,
                                     max_output_tokens=60, temperature=1.0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.completed"
    added = [e for e in events if e.type == "response.output_item.added"]
    assert len(added) == 1 and added[0].item.type == "function_call"
    fragments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(fragments) > 1
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == "".join(fragments)
    jsonschema.validate(json.loads(done.arguments), tool["parameters"])
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output[0].type == "function_call"
    assert final.output[0].arguments == done.arguments  # type: ignore[union-attr]
    # the wire events parse as our typed stream events; the JSON answer as our Response
    raw = httpx.post(f"{roomy.base_url}/responses", timeout=60, json={
        "model": MODEL, "input": "hi", "max_output_tokens": 4, "stream": True})
    adapter = TypeAdapter(ResponseStreamEvent)
    data = [line.removeprefix("data: ") for line in raw.text.splitlines()
            if line.startswith("data: ")]
    assert [adapter.validate_json(d).type for d in data][-1] == "response.incomplete"
    whole = httpx.post(f"{roomy.base_url}/responses", timeout=60, json={
        "model": MODEL, "input": "hi", "max_output_tokens": 4})
    Response.model_validate_json(whole.text)
    spec = httpx.get(f"{roomy.root_url}/openapi.json", timeout=10).json()
    answers = spec["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]
    assert answers["application/json"]["schema"]["$ref"].endswith("/Response")
    stream_schema = json.dumps(answers["text/event-stream"]["schema"])
    assert "response.function_call_arguments.delta" in stream_schema
