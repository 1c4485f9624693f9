"""What real OpenAI clients ask for, through the official `openai` client against `moeflow up`
(tiny llama, float32): logprobs, n choices, echo log-likelihoods, penalties, logit_bias,
/tokenize and /detokenize."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import torch

from moeflow.text.tokenizer import TextTokenizer
from tests.platform_process import Platform
from tests.reference import hf_chat_ids, hf_greedy, hf_model

MODEL = "tiny"
QUESTION = [{"role": "user", "content": "Tell me about the river and the town."}]


def client(platform: Platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform.base_url, api_key="unused", max_retries=0)


def hf_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf_model(model_dir)(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_chat_logprobs_equal_transformers(platform: Platform,
                                          tiny_dirs: dict[str, Path]) -> None:
    model_dir = tiny_dirs["llama"]
    prompt = hf_chat_ids(model_dir, QUESTION)
    expected = hf_greedy(model_dir, prompt, 5)
    r = client(platform).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=5, temperature=0,  # type: ignore[arg-type]
        logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == len(expected)
    ref = hf_logprobs(model_dir, prompt + expected)
    tok = TextTokenizer.from_dir(model_dir)
    for i, (entry, token_id) in enumerate(zip(content, expected, strict=True)):
        row = ref[len(prompt) - 1 + i]
        assert entry.token == tok.decode([token_id], skip_special_tokens=False)
        assert entry.logprob == pytest.approx(float(row[token_id]), abs=1e-4)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(float(row.max()), abs=1e-4)
    # streamed: the same logprobs, chunk by chunk
    stream = client(platform).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=5, temperature=0,  # type: ignore[arg-type]
        logprobs=True, stream=True)
    streamed = [e.logprob for c in stream for ch in c.choices
                if ch.logprobs and ch.logprobs.content for e in ch.logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-6)


def test_n_choices_chat_and_completions(platform: Platform) -> None:
    c = client(platform)
    r = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, n=3,  # type: ignore[arg-type]
                                  temperature=1.0, seed=7)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert r.usage is not None and 3 <= r.usage.completion_tokens <= 18
    single = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)  # type: ignore[arg-type]
    assert single.usage is not None
    assert r.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    texts = {ch.message.content for ch in r.choices}
    assert len(texts) > 1, "seeded choices must differ (seed + index)"
    greedy = c.completions.create(model=MODEL, prompt=["a b c", "d e"], max_tokens=4, n=2,
                                  temperature=0)
    assert [ch.index for ch in greedy.choices] == [0, 1, 2, 3]
    assert greedy.choices[0].text == greedy.choices[1].text
    assert greedy.choices[2].text == greedy.choices[3].text
    stream = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, n=2,  # type: ignore[arg-type]
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    parts: dict[int, str] = {0: "", 1: ""}
    usage = None
    for chunk in stream:
        for ch in chunk.choices:
            parts[ch.index] += ch.delta.content or ""
        usage = chunk.usage or usage
    assert parts[0] == parts[1] != ""
    assert usage is not None and usage.completion_tokens == 8


def test_echo_gives_prompt_log_likelihoods(platform: Platform,
                                           tiny_dirs: dict[str, Path]) -> None:
    """What lm-evaluation-harness's local-completions sends for loglikelihood."""
    prompt = [1, 15, 27, 99, 3, 64, 8]
    r = client(platform).completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                            temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.tokens is not None
    assert len(lp.token_logprobs) == len(prompt) + 1
    assert lp.token_logprobs[0] is None
    ref = hf_logprobs(tiny_dirs["llama"], prompt)
    for pos in range(1, len(prompt)):
        assert lp.token_logprobs[pos] == pytest.approx(float(ref[pos - 1, prompt[pos]]),
                                                       abs=1e-4)
    tok = TextTokenizer.from_dir(tiny_dirs["llama"])
    echo = tok.decode(prompt, skip_special_tokens=False)
    assert r.choices[0].text.startswith(echo)
    assert lp.text_offset is not None and lp.text_offset[len(prompt)] == len(echo)


def test_penalties_bias_and_min_tokens_are_honoured(platform: Platform) -> None:
    c = client(platform)
    plain = c.completions.create(model=MODEL, prompt="a b c", max_tokens=6, temperature=0)
    forced = c.completions.create(model=MODEL, prompt="a b c", max_tokens=3, temperature=0,
                                  logit_bias={"77": 100})
    base = platform.root_url
    tok_77 = httpx.post(f"{base}/detokenize", json={"model": MODEL, "tokens": [77]},
                        timeout=10).json()["prompt"]
    assert forced.choices[0].text == tok_77 * 3
    penalised = c.completions.create(model=MODEL, prompt="a b c", max_tokens=6, temperature=0,
                                     presence_penalty=2.0, frequency_penalty=2.0,
                                     extra_body={"repetition_penalty": 1.3, "min_tokens": 2})
    assert penalised.usage is not None and penalised.usage.completion_tokens >= 2
    again = c.completions.create(model=MODEL, prompt="a b c", max_tokens=6, temperature=0)
    assert again.choices[0].text == plain.choices[0].text


def test_tokenize_and_detokenize(platform: Platform, tiny_dirs: dict[str, Path]) -> None:
    base = platform.root_url
    r = httpx.post(f"{base}/tokenize", json={"model": MODEL, "prompt": "the river"}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    tok = TextTokenizer.from_dir(tiny_dirs["llama"])
    assert body["tokens"] == tok.encode_prompt("the river")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    chat = httpx.post(f"{base}/tokenize", json={"model": MODEL, "messages": QUESTION},
                      timeout=10).json()
    assert chat["tokens"] == hf_chat_ids(tiny_dirs["llama"], QUESTION)
    back = httpx.post(f"{base}/detokenize", json={"model": MODEL, "tokens": body["tokens"]},
                      timeout=10)
    assert back.json() == {"prompt": "the river"}
    bad = httpx.post(f"{base}/detokenize", json={"model": MODEL, "tokens": [10**9]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
