"""response_format json_object / json_schema through the official `openai` client: the engine
masks each constrained row with the grammar, so even a tiny random model answers JSON that
validates; unconstrained requests beside it are unchanged (tiny llama)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import openai
import pytest

from moeflow.text.tokenizer import TextTokenizer
from tests.platform_process import Platform
from tests.reference import hf_chat_ids, hf_greedy

MODEL = "tiny"
QUESTION = [{"role": "user", "content": "Describe the weather as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "sunny": {"type": "boolean"},
        "degrees": {"type": "integer", "minimum": -50, "maximum": 60},
        "wind": {"enum": ["none", "light", "strong"]},
    },
    "required": ["city", "sunny", "degrees", "wind"],
    "additionalProperties": False,
}


def fmt(schema: dict[str, object] = SCHEMA) -> dict[str, object]:
    return {"type": "json_schema",
            "json_schema": {"name": "weather", "schema": schema, "strict": True}}


async def test_json_schema_output_validates_and_plain_requests_are_unchanged(
    platform: Platform, tiny_dirs: dict[str, Path]
) -> None:
    c = openai.AsyncOpenAI(base_url=platform.base_url, api_key="x", max_retries=0)
    model_dir = tiny_dirs["llama"]
    expected = TextTokenizer.from_dir(model_dir).decode(
        hf_greedy(model_dir, hf_chat_ids(model_dir, QUESTION), 10))
    constrained = [
        c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=80,  # type: ignore[arg-type]
                                  temperature=t, seed=i, response_format=fmt())  # type: ignore[arg-type]
        for i, t in enumerate([0.0, 1.0, 1.0])
    ]
    plain = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10,  # type: ignore[arg-type]
                                      temperature=0)
    results = await asyncio.gather(plain, *constrained)
    assert results[0].choices[0].message.content == expected
    for r in results[1:]:
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), SCHEMA)
    stream = await c.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=80, temperature=0,  # type: ignore[arg-type]
        response_format=fmt(), stream=True)  # type: ignore[arg-type]
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    jsonschema.validate(json.loads(text), SCHEMA)
    await c.close()


def test_json_object_and_bad_formats(platform: Platform) -> None:
    c = openai.OpenAI(base_url=platform.base_url, api_key="x", max_retries=0)
    r = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40,  # type: ignore[arg-type]
                                  temperature=0, response_format={"type": "json_object"})
    text = r.choices[0].message.content or ""
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model=MODEL, messages=QUESTION,  # type: ignore[arg-type]
                                  response_format=fmt({"type": "nonsense"}))  # type: ignore[arg-type]
    assert (bad.value.param or "").startswith("response_format")
    with pytest.raises(openai.BadRequestError) as kind:
        c.chat.completions.create(model=MODEL, messages=QUESTION,  # type: ignore[arg-type]
                                  response_format={"type": "yaml"})  # type: ignore[arg-type]
    assert kind.value.param == "response_format.type"
