"""Logprobs, prompt logprobs, penalties, min_tokens and logit_bias in the real engine (tiny
llama, float32), checked against transformers' own logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow.domain.messages import GenerateRequest, SamplingParams, TokenChunk
from moeflow.engine.llm_engine import LLMEngine
from tests.reference import hf_greedy, hf_model, make_engine

PROMPT = [1, 15, 27, 99, 3, 64, 8, 200, 31]
OTHER = [1, 40, 41, 42, 43]


@pytest.fixture(scope="module")
def engine(tiny_dirs: dict[str, Path]) -> LLMEngine:
    return make_engine(tiny_dirs["llama"], max_model_len=256)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]
        ) -> dict[str, list[TokenChunk]]:
    for rid, (prompt, sampling) in requests.items():
        engine.add_request(GenerateRequest(request_id=rid, prompt_token_ids=tuple(prompt),
                                           sampling=sampling))
    out: dict[str, list[TokenChunk]] = {rid: [] for rid in requests}
    for _ in range(1000):
        if not engine.has_work:
            break
        for chunk in engine.step():
            out[chunk.request_id].append(chunk)
    assert not engine.has_work
    return out


def hf_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax over the logits at every position of ``ids``."""
    with torch.inference_mode():
        logits = hf_model(model_dir)(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_logprobs_equal_transformers_and_greedy_is_unchanged(
    engine: LLMEngine, tiny_dirs: dict[str, Path]
) -> None:
    model_dir = tiny_dirs["llama"]
    expected = hf_greedy(model_dir, PROMPT, 6)
    out = run(engine, {
        "lp": (PROMPT, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3)),
        "plain": (PROMPT, SamplingParams(max_tokens=6, temperature=0.0)),
    })
    tokens = [t for c in out["lp"] for t in c.token_ids]
    assert tokens == expected
    assert [t for c in out["plain"] for t in c.token_ids] == expected
    assert all(not c.logprobs for c in out["plain"])
    ref = hf_logprobs(model_dir, PROMPT + tokens)
    lps = [lp for c in out["lp"] for lp in c.logprobs]
    assert [lp.token_id for lp in lps] == tokens
    for i, lp in enumerate(lps):
        row = ref[len(PROMPT) - 1 + i]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t.token_id for t in lp.top] == top.indices.tolist()
        for t, v in zip(lp.top, top.values.tolist(), strict=True):
            assert t.logprob == pytest.approx(v, abs=1e-4)


def test_prompt_logprobs_equal_transformers(engine: LLMEngine,
                                            tiny_dirs: dict[str, Path]) -> None:
    out = run(engine, {"echo": (PROMPT, SamplingParams(max_tokens=1, temperature=0.0,
                                                        prompt_logprobs=1))})
    first = out["echo"][0]
    ref = hf_logprobs(tiny_dirs["llama"], PROMPT)
    assert [p.token_id for p in first.prompt_logprobs] == PROMPT
    assert first.prompt_logprobs[0].logprob is None
    for pos in range(1, len(PROMPT)):
        got = first.prompt_logprobs[pos]
        assert got.logprob == pytest.approx(float(ref[pos - 1, PROMPT[pos]]), abs=1e-4)
        assert got.top[0].token_id == int(ref[pos - 1].argmax())


def test_penalties_and_bias_apply_per_row_only(engine: LLMEngine,
                                               tiny_dirs: dict[str, Path]) -> None:
    expected = hf_greedy(tiny_dirs["llama"], OTHER, 8)
    banned = expected[0]
    out = run(engine, {
        "plain": (OTHER, SamplingParams(max_tokens=8, temperature=0.0)),
        "bias": (OTHER, SamplingParams(max_tokens=8, temperature=0.0,
                                       logit_bias=((banned, -100.0),))),
        "forced": (OTHER, SamplingParams(max_tokens=4, temperature=0.0,
                                         logit_bias=((77, 100.0),))),
        "rep": (OTHER, SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.5,
                                      frequency_penalty=2.0, presence_penalty=2.0)),
    })
    def toks(rid: str) -> list[int]:
        return [t for c in out[rid] for t in c.token_ids]
    assert toks("plain") == expected
    assert banned not in toks("bias")
    assert toks("forced") == [77, 77, 77, 77]
    rep = toks("rep")
    # with strong penalties a token never follows itself
    assert all(a != b for a, b in zip(rep, rep[1:], strict=False)), rep


def test_min_tokens_blocks_eos(engine: LLMEngine) -> None:
    eos = min(engine.eos_token_ids)
    # force EOS as the best token; min_tokens keeps it away for 3 tokens
    sampling = SamplingParams(max_tokens=6, temperature=0.0, min_tokens=3,
                              logit_bias=((eos, 100.0),))
    out = run(engine, {"min": (OTHER, sampling)})
    tokens = [t for c in out["min"] for t in c.token_ids]
    assert len(tokens) == 4 and eos not in tokens[:3] and tokens[3] == eos
    assert out["min"][-1].finish_reason == "stop"
