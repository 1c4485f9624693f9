"""The OpenAI features through `moeflow up --mode ae` (tiny Qwen3-MoE, shared-memory XCCL,
two expert instances): the attention instance samples, so logprobs, grammar-constrained
output, forced tool calls, n choices and the Responses API must hold there as colocated."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
import torch

from moeflow.text.tokenizer import TextTokenizer
from tests.platform_process import Platform, start_platform
from tests.reference import hf_greedy, hf_model

MODEL = "tiny-moe"
PROMPT = [1, 15, 27, 99, 3, 64, 8, 200, 31, 5, 6, 7]
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}


@pytest.fixture(scope="module")
def ae(tiny_dirs: dict[str, Path]) -> Iterator[Platform]:
    p = start_platform(tiny_dirs["qwen3_moe"], [
        "--served-model-name", MODEL, "--mode", "ae", "--attention", "1",
        "--expert-instances", "2", "--transport", "shm", "--rebalance-interval-s", "0",
        "--max-model-len", "1536"])
    yield p
    assert p.stop() == 0, p.log()[-3000:]


def client(platform: Platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform.base_url, api_key="x", max_retries=0, timeout=120)


def test_ae_logprobs_and_n_choices_equal_transformers(ae: Platform,
                                                      tiny_dirs: dict[str, Path]) -> None:
    model_dir = tiny_dirs["qwen3_moe"]
    expected = hf_greedy(model_dir, PROMPT, 5)
    r = client(ae).completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                      logprobs=2, echo=True, n=2)
    ids = PROMPT + expected
    with torch.inference_mode():
        logits = hf_model(model_dir)(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    text = TextTokenizer.from_dir(model_dir).decode(expected)
    for choice in r.choices:
        lp = choice.logprobs
        assert lp is not None and lp.token_logprobs is not None
        assert lp.token_logprobs[0] is None
        for pos in range(1, len(ids)):
            assert lp.token_logprobs[pos] == pytest.approx(float(ref[pos - 1, ids[pos]]),
                                                           abs=1e-4)
        assert choice.text.endswith(text)  # echo: the prompt's text, then the answer
    assert r.usage is not None and r.usage.prompt_tokens == len(PROMPT)


def test_ae_json_schema_and_forced_tool_calls_validate(ae: Platform) -> None:
    c = client(ae)
    for seed in range(2):
        r = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "weather?"}], max_tokens=80,
            temperature=1.0, seed=seed, response_format={
                "type": "json_schema", "json_schema": {"name": "w", "schema": CITY}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), CITY)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY}}]
    call = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=200,  # type: ignore[arg-type]
        temperature=1.0,
        seed=3)
    choice = call.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for tool_call in choice.message.tool_calls:
        assert tool_call.function.name == "get_weather"  # type: ignore[union-attr]
        jsonschema.validate(json.loads(tool_call.function.arguments), CITY)  # type: ignore[union-attr]


def test_ae_responses_api_streams_what_it_answers(ae: Platform) -> None:
    c = client(ae)
    whole = c.responses.create(model=MODEL, input="Tell me a story.", max_output_tokens=8,
                               temperature=0)
    events = list(c.responses.create(model=MODEL, input="Tell me a story.",
                                     max_output_tokens=8, temperature=0, stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text != ""
