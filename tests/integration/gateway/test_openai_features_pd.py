"""Logprobs, logit_bias, min_tokens, penalties and echo through `moeflow up --mode pd`: the
first token is sampled on the prefill instance, the rest on a decode instance, and the
request's sampling state carries over (tiny llama, float32, shared-memory XCCL)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch

from moeflow.domain.messages import GenerateRequest, SamplingParams
from moeflow.text.tokenizer import TextTokenizer
from tests.platform_process import ALWAYS_SPLIT, Platform, start_platform
from tests.reference import hf_greedy, hf_model, make_engine

MODEL = "tiny"
PROMPT = [1, 15, 27, 99, 3, 64, 8, 200, 31, 5, 6, 7]


@pytest.fixture(scope="module")
def pd(tiny_dirs: dict[str, Path]) -> Iterator[Platform]:
    p = start_platform(tiny_dirs["llama"], [
        "--served-model-name", MODEL, "--mode", "pd", "--max-model-len", "256",
        "--prefill", "1", "--decode", "1", "--transport", "shm", *ALWAYS_SPLIT])
    yield p
    assert p.stop() == 0, p.log()[-3000:]


def test_split_logprobs_equal_transformers_first_token_included(
    pd: Platform, tiny_dirs: dict[str, Path]
) -> None:
    model_dir = tiny_dirs["llama"]
    expected = hf_greedy(model_dir, PROMPT, 5)
    c = openai.OpenAI(base_url=pd.base_url, api_key="x", max_retries=0)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                             logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None
    with torch.inference_mode():
        logits = hf_model(model_dir)(torch.tensor([PROMPT + expected])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    ids = PROMPT + expected
    assert lp.token_logprobs[0] is None
    for pos in range(1, len(ids)):
        assert lp.token_logprobs[pos] == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-4)
    assert (pd.metric("moeflow_requests_by_mode_total", mode="split") or 0) >= 1


def test_split_bias_min_tokens_and_penalties_carry_over(
    pd: Platform, tiny_dirs: dict[str, Path]
) -> None:
    c = openai.OpenAI(base_url=pd.base_url, api_key="x", max_retries=0)
    forced = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                  logit_bias={"77": 100})
    token_77 = httpx.post(f"{pd.root_url}/detokenize", json={"model": MODEL, "tokens": [77]},
                          timeout=10).json()["prompt"]
    assert forced.choices[0].text == token_77 * 3  # the prefill's token and the decode's
    # the decode instance's penalties count the token the prefill instance sampled: a bias
    # just large enough to make 77 the first token would make it the second too, unless the
    # presence + frequency penalty (4) counts the first one
    with torch.inference_mode():
        model = hf_model(tiny_dirs["llama"])
        l0 = model(torch.tensor([PROMPT])).logits[0, -1]
        l1 = model(torch.tensor([[*PROMPT, 77]])).logits[0, -1]
    m0, m1 = float(l0.max() - l0[77]), float(l1.max() - l1[77])
    bias = max(m0, m1) + 0.3
    assert bias - 4.0 < m1, "the tiny model's logits no longer suit this test"
    sampling = SamplingParams(max_tokens=6, temperature=0.0, presence_penalty=2.0,
                              frequency_penalty=2.0, min_tokens=4, logit_bias=((77, bias),))
    engine = make_engine(tiny_dirs["llama"], max_model_len=256)
    engine.add_request(GenerateRequest(request_id="local", prompt_token_ids=tuple(PROMPT),
                                       sampling=sampling))
    local: list[int] = []
    while engine.has_work:
        for chunk in engine.step():
            local.extend(chunk.token_ids)
    assert local[0] == 77 and local[1] != 77
    split = c.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, presence_penalty=2.0,
        frequency_penalty=2.0, logit_bias={"77": bias}, extra_body={"min_tokens": 4})
    assert split.choices[0].text == TextTokenizer.from_dir(tiny_dirs["llama"]).decode(local)


def test_split_json_schema_constraint_resumes_on_decode(pd: Platform) -> None:
    """The prefill instance's first token is constrained, and the decode instance's grammar
    state starts after it: the whole answer validates."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "level": {"enum": ["low", "high"]}},
              "required": ["ok", "level"], "additionalProperties": False}
    c = openai.OpenAI(base_url=pd.base_url, api_key="x", max_retries=0)
    for seed in range(3):
        r = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "status?"}], max_tokens=60,
            temperature=1.0, seed=seed, response_format={
                "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)


def test_split_responses_api_streams(pd: Platform) -> None:
    c = openai.OpenAI(base_url=pd.base_url, api_key="x", max_retries=0)
    whole = c.responses.create(model=MODEL, input="Tell me a story.", max_output_tokens=8,
                               temperature=0)
    events = list(c.responses.create(model=MODEL, input="Tell me a story.",
                                     max_output_tokens=8, temperature=0, stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text != ""


def test_split_n_choices_share_the_prompt_and_match_separate_requests(
    pd: Platform, tiny_dirs: dict[str, Path]
) -> None:
    """n > 1 under a split: the prefill instance computes the prompt once (the other choices
    take its full 16-token blocks from the prefix cache), and every choice is what the same
    request alone gives (greedy: transformers' tokens; seeded: choice j = seed + j)."""
    prompt = list(range(300, 341))  # 41 tokens, seen by no other test: 2 full blocks each
    c = openai.OpenAI(base_url=pd.base_url, api_key="x", max_retries=0)
    hits_before = pd.metric("moeflow_prefix_cache_hit_tokens_total") or 0.0
    greedy = c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, n=4)
    hits = (pd.metric("moeflow_prefix_cache_hit_tokens_total") or 0.0) - hits_before
    # three choices took the first one's two full blocks (on a tiny model the prefill can end
    # before the next choice arrives anyway: tests/integration/engine/
    # test_n_choices_share_prompt.py pins the decision itself, choices arriving together)
    assert hits >= 3 * 32, hits
    expected = TextTokenizer.from_dir(tiny_dirs["llama"]).decode(
        hf_greedy(tiny_dirs["llama"], prompt, 6))
    assert [ch.text for ch in sorted(greedy.choices, key=lambda ch: ch.index)] == [expected] * 4
    seeded = c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0,
                                  seed=11, n=3)
    alone = [c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0,
                                  seed=11 + j).choices[0].text for j in range(3)]
    assert [ch.text for ch in sorted(seeded.choices, key=lambda ch: ch.index)] == alone


def test_split_n_choices(pd: Platform, tiny_dirs: dict[str, Path]) -> None:
    """n choices through prefill + decode: greedy choices equal transformers' answer, seeded
    sampled choices differ (seed + index), usage counts the prompt once."""
    c = openai.OpenAI(base_url=pd.base_url, api_key="x", max_retries=0)
    expected = TextTokenizer.from_dir(tiny_dirs["llama"]).decode(
        hf_greedy(tiny_dirs["llama"], PROMPT, 4))
    greedy = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2, temperature=0)
    assert [ch.text for ch in greedy.choices] == [expected, expected]
    assert greedy.usage is not None and greedy.usage.prompt_tokens == len(PROMPT)
    sampled = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=6, n=3, temperature=1.0, seed=7)
    assert [ch.index for ch in sampled.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in sampled.choices}) > 1
