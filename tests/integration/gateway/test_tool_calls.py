"""Tool calling through the official `openai` client (tiny llama, ChatML template without
tool support: tools go in a system message). "required" and named choices are grammar-
constrained, so even a random model returns calls whose arguments validate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from moeflow.gateway.protocol import ChatCompletionRequest
from moeflow.gateway.tools import parse_calls, plan_tools
from tests.platform_process import Platform, start_platform

MODEL = "tiny"
WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 10},
                          "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def platform(tiny_dirs: dict[str, Path]) -> Iterator[Platform]:
    """The tiny llama with room for the tools' system message (its vocabulary is tiny, so
    text takes many tokens)."""
    p = start_platform(tiny_dirs["llama"],
                       ["--served-model-name", MODEL, "--max-model-len", "1536"])
    yield p
    assert p.stop() == 0, p.log()[-3000:]


def client(platform: Platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform.base_url, api_key="x", max_retries=0)


@pytest.mark.parametrize("parallel", [False, True])
def test_required_gives_schema_valid_calls(platform: Platform, parallel: bool) -> None:
    for seed in range(3):
        r = client(platform).chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
            parallel_tool_calls=parallel, max_tokens=120, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls or []
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            assert call.type == "function" and call.id.startswith("call_")
            fn = call.function  # type: ignore[union-attr]
            jsonschema.validate(json.loads(fn.arguments), SCHEMAS[fn.name])


def test_named_choice_streams_delta_tool_calls(platform: Platform) -> None:
    """A call streams as OpenAI streams it: the first delta has the index, id, type and name,
    the next ones fragments of the arguments; the openai client's stream helper reassembles
    them into the call."""
    with client(platform).chat.completions.stream(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False) as stream:
        deltas = [d for event in stream if event.type == "chunk"
                  for ch in event.chunk.choices for d in ch.delta.tool_calls or []]
        final = stream.get_final_completion()
    assert deltas[0].id and deltas[0].id.startswith("call_") and deltas[0].type == "function"
    assert deltas[0].function is not None and deltas[0].function.name == "get_time"
    fragments = [d.function.arguments for d in deltas[1:] if d.function is not None]
    assert len(fragments) > 1 and all(d.id is None and d.index == 0 for d in deltas[1:])
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].id == deltas[0].id
    fn = calls[0].function  # type: ignore[union-attr]
    assert fn.name == "get_time" and fn.arguments == "".join(f or "" for f in fragments)
    jsonschema.validate(json.loads(fn.arguments), TIME)


def test_parallel_calls_stream_with_their_own_indexes(platform: Platform) -> None:
    """Accumulating the raw deltas by index, as clients without the helper do."""
    stream = client(platform).chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
        max_tokens=200, temperature=1.0, seed=5, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and sorted(calls) == list(range(len(calls))) != []
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_a_conversation_with_calls_and_results_renders(platform: Platform) -> None:
    messages = [*ASK,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather",
                                  "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}]
    r = client(platform).chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,  # type: ignore[arg-type]
                                                 max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    none = client(platform).chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,  # type: ignore[arg-type]
                                                    tool_choice="none", max_tokens=4)
    assert none.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError) as bad:
        client(platform).chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "nope"}})
    assert bad.value.param == "tool_choice"


def test_auto_parses_the_native_tool_call_format() -> None:
    body = ChatCompletionRequest.model_validate({"model": MODEL, "messages": ASK,
                                                 "tools": TOOLS})
    plan = plan_tools(body)
    assert plan is not None and plan.choice == "auto" and plan.grammar is None
    text = ("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
            "{\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>\n<tool_call>\n"
            "{\"name\": \"get_time\", \"arguments\": {\"zone\": \"utc\"}}\n</tool_call>")
    content, calls = parse_calls(text, plan)
    assert content == "Let me check."
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "c"}
    assert parse_calls("no call here", plan) == ("no call here", [])
