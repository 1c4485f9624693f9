"""LangChain's OpenAI chat model (`langchain-openai`) against `moeflow up`, colocated and PD
(tiny llama, float32): `bind_tools` with a forced choice returns tool calls whose arguments
validate against the tool's schema, streamed or not, and `with_structured_output(...,
method="json_schema")` returns a validated object. The tiny model is random, so only the
grammar constraint makes these answers valid: a client-side retry or a lucky sample cannot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import jsonschema
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.platform_process import ALWAYS_SPLIT, Platform, start_platform

MODEL = "tiny"
WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 10},
                          "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "description": "The weather in a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time",
                                           "parameters": {
                                               "type": "object",
                                               "properties": {"zone": {"enum": ["utc", "cet"]}},
                                               "required": ["zone"],
                                               "additionalProperties": False}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Forecast(BaseModel):
    """A forecast for one city."""

    city: str = Field(max_length=12)
    sunny: bool
    degrees: int = Field(ge=-50, le=60)
    wind: Literal["none", "light", "strong"]


@pytest.fixture(scope="module", params=["colocated", "pd"])
def served(request: pytest.FixtureRequest, tiny_dirs: dict[str, Path]) -> Iterator[Platform]:
    """Room for the tools' system message (the tiny vocabulary makes text long)."""
    mode = ["--mode", "pd", "--prefill", "1", "--decode", "1", "--transport", "shm",
            *ALWAYS_SPLIT] \
        if request.param == "pd" else []
    p = start_platform(tiny_dirs["llama"],
                       ["--served-model-name", MODEL, "--max-model-len", "1536", *mode])
    yield p
    assert p.stop() == 0, p.log()[-3000:]


def chat(platform: Platform, **kwargs: object) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=platform.base_url, api_key="x",  # type: ignore[arg-type]
                      max_retries=0, timeout=60, **kwargs)


def test_bind_tools_gives_schema_valid_calls(served: Platform) -> None:
    for seed in range(2):
        llm = chat(served, temperature=1.0, seed=seed, max_tokens=120)
        message = llm.bind_tools(TOOLS, tool_choice="required").invoke("Weather in Paris?")
        assert message.tool_calls, message
        for call in message.tool_calls:
            assert call["id"] and call["id"].startswith("call_")
            jsonschema.validate(call["args"], SCHEMAS[call["name"]])
    named = chat(served, temperature=0, max_tokens=60).bind_tools(
        TOOLS, tool_choice="get_time").invoke("What time is it?")
    assert [c["name"] for c in named.tool_calls] == ["get_time"]
    jsonschema.validate(named.tool_calls[0]["args"], SCHEMAS["get_time"])


def test_bind_tools_streamed_calls_reassemble(served: Platform) -> None:
    """LangChain sums the streamed `delta.tool_calls` fragments back into whole calls."""
    llm = chat(served, temperature=1.0, seed=3, max_tokens=120).bind_tools(
        TOOLS, tool_choice="get_weather")
    total: AIMessageChunk | None = None
    num_chunks_with_args = 0
    for chunk in llm.stream("Weather in Paris?"):
        assert isinstance(chunk, AIMessageChunk)
        num_chunks_with_args += any(c.get("args") for c in chunk.tool_call_chunks)
        total = chunk if total is None else total + chunk
    assert total is not None and total.tool_calls  # parallel_tool_calls defaults to true
    for call in total.tool_calls:
        assert call["name"] == "get_weather" and call["id"]
        jsonschema.validate(call["args"], WEATHER)
    assert num_chunks_with_args > 1, "arguments must stream in fragments, not whole at the end"


def test_with_structured_output_json_schema(served: Platform) -> None:
    for seed in range(2):
        llm = chat(served, temperature=1.0, seed=seed, max_tokens=120)
        # strict: the openai client makes the schema strict (no other properties), as it
        # does for OpenAI; a non-strict schema lets a random model add keys until max_tokens
        forecast = llm.with_structured_output(Forecast, method="json_schema",
                                              strict=True).invoke(
            "The forecast for Paris, please.")
        assert isinstance(forecast, Forecast)
        jsonschema.validate(forecast.model_dump(), Forecast.model_json_schema())
    schema = {**Forecast.model_json_schema(), "additionalProperties": False}
    raw = chat(served, temperature=0, max_tokens=120).with_structured_output(
        schema, method="json_schema", include_raw=True).invoke(
        "The forecast for Lyon?")
    assert isinstance(raw, dict) and raw["parsing_error"] is None
    Forecast.model_validate(raw["parsed"])
