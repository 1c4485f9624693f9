"""Streamed tool calls (moeflow.gateway.tool_stream): whatever pieces the text arrives in, the
deltas reassemble into what the non-streamed answer (tools.parse_calls) says, and a call is
announced (id, type, name) before its arguments go out in fragments."""

from __future__ import annotations

import json
import random

import pytest

from moeflow.gateway.protocol import ChatCompletionRequest, DeltaToolCall
from moeflow.gateway.tool_stream import ToolCallStream
from moeflow.gateway.tools import ToolPlan, parse_calls, plan_tools

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string"}}}}}]


def plan(**fields: object) -> ToolPlan:
    body = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
        **fields})
    found = plan_tools(body)
    assert found is not None
    return found


def stream_in_pieces(p: ToolPlan, text: str, seed: int) -> tuple[str, list[DeltaToolCall]]:
    rng = random.Random(seed)
    stream = ToolCallStream(p)
    content: list[str] = []
    deltas: list[DeltaToolCall] = []
    i = 0
    while i < len(text):
        n = rng.randint(1, 6)
        piece_content, piece_deltas = stream.feed(text[i:i + n])
        content.append(piece_content)
        deltas += piece_deltas
        i += n
    content.append(stream.finish())
    return "".join(content), deltas


def reassemble(deltas: list[DeltaToolCall]) -> list[dict[str, str]]:
    """What the openai stream helpers do: the first entry of an index opens the call, the
    others append to its arguments."""
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id and d.id.startswith("call_") and d.type == "function"
            assert d.function is not None and d.function.name and d.function.arguments == ""
            calls[d.index] = {"name": d.function.name, "arguments": ""}
        else:
            assert d.id is None and d.function is not None and d.function.name is None
            calls[d.index]["arguments"] += d.function.arguments or ""
    assert sorted(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)]


AUTO_TEXT = ("  Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
             "{\"city\": \"Paris <3 \\\"}\"}}\n</tool_call>\nThen\n<tool_call>\n"
             "{\"arguments\": {\"zone\": \"utc\"}, \"name\": \"get_time\"}\n</tool_call>\n ")


@pytest.mark.parametrize("seed", range(8))
def test_auto_streams_content_and_calls_as_parse_calls_reads_them(seed: int) -> None:
    p = plan(parallel_tool_calls=True)
    content, deltas = stream_in_pieces(p, AUTO_TEXT, seed)
    expected_content, expected_calls = parse_calls(AUTO_TEXT, p)
    assert content == expected_content == "Let me check.\n\nThen"
    calls = reassemble(deltas)
    assert [c["name"] for c in calls] == [c.function.name for c in expected_calls]
    assert [json.loads(c["arguments"]) for c in calls] == [
        json.loads(c.function.arguments) for c in expected_calls]
    # the arguments went out in more than one fragment
    assert sum(1 for d in deltas if d.index == 0) > 2


def test_auto_without_parallel_keeps_the_first_call_and_plain_text_passes() -> None:
    p = plan(parallel_tool_calls=False)
    _, deltas = stream_in_pieces(p, AUTO_TEXT, 1)
    assert [c["name"] for c in reassemble(deltas)] == ["get_weather"]
    content, none = stream_in_pieces(p, "a < b and <tool not a tag>  ", 2)
    assert content == "a < b and <tool not a tag>" and none == []


@pytest.mark.parametrize("seed", range(4))
def test_constrained_single_and_parallel(seed: int) -> None:
    single = '{"name":"get_time","arguments":{"zone":"c{e}t\\","}}'
    content, deltas = stream_in_pieces(plan(tool_choice="required",
                                            parallel_tool_calls=False), single, seed)
    assert content == ""
    assert reassemble(deltas) == [{"name": "get_time", "arguments": '{"zone":"c{e}t\\","}'}]
    many = ('[{"name":"get_weather","arguments":{"city":"Rome"}},'
            '{"name":"get_time","arguments":{"zone":"utc"}}]')
    _, deltas = stream_in_pieces(plan(tool_choice="required"), many, seed)
    assert reassemble(deltas) == [{"name": "get_weather", "arguments": '{"city":"Rome"}'},
                                  {"name": "get_time", "arguments": '{"zone":"utc"}'}]


def test_a_cut_call_is_announced_with_what_was_written() -> None:
    stream = ToolCallStream(plan(tool_choice={"type": "function",
                                              "function": {"name": "get_weather"}},
                                 parallel_tool_calls=False))
    _, deltas = stream.feed('{"name":"get_weather","arguments":{"ci')
    assert reassemble(deltas) == [{"name": "get_weather", "arguments": '{"ci'}]
    assert stream.num_calls == 1
