"""LoRA adapters in the engine: greedy tokens with each adapter equal transformers + PEFT's
(unmerged), with base requests and two adapters in one batch; the prefix cache never shares
blocks across adapters; the memory budget evicts idle adapters only; logprobs use the adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moeflow.domain.errors import InvalidRequestError, ModelNotFoundError
from moeflow.domain.messages import GenerateRequest, SamplingParams
from moeflow.engine.llm_engine import LLMEngine
from tests.lora_kit import peft_greedy, peft_model, two_adapters
from tests.reference import hf_greedy, make_engine

MAX_TOKENS = 10
PROMPTS = [[5, 6, 7, 8, 9, 10] * 3, [11, 12, 13, 14, 15], list(range(20, 60))]


@pytest.fixture(scope="module")
def adapters(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Path]:
    return two_adapters(tiny_dirs["llama"], tmp_path_factory.mktemp("adapters"))


def _run(engine: LLMEngine, jobs: list[tuple[str, list[int], str | None]]
         ) -> dict[str, tuple[list[int], int]]:
    """Admit every job at once, step to the end: request id -> (tokens, cached tokens)."""
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    for rid, prompt, adapter in jobs:
        engine.add_request(GenerateRequest(request_id=rid, prompt_token_ids=tuple(prompt),
                                           sampling=sampling, adapter=adapter))
    out: dict[str, tuple[list[int], int]] = {rid: ([], 0) for rid, _, _ in jobs}
    while engine.has_work:
        for chunk in engine.step():
            tokens, _ = out[chunk.request_id]
            out[chunk.request_id] = (tokens + list(chunk.token_ids), chunk.num_cached_tokens)
    return out


def _expected(model: Path, adapters: dict[str, Path], prompt: list[int],
              adapter: str | None) -> list[int]:
    if adapter is None:
        return hf_greedy(model, prompt, MAX_TOKENS)
    return peft_greedy(model, adapters[adapter], prompt, MAX_TOKENS)


def test_base_and_two_adapters_in_one_batch_equal_peft(
    tiny_dirs: dict[str, Path], adapters: dict[str, Path]
) -> None:
    model = tiny_dirs["llama"]
    engine = make_engine(model, lora_adapters=adapters)
    jobs = [(f"{i}-{a}", p, a) for i, p in enumerate(PROMPTS) for a in (None, "a", "b")]
    out = _run(engine, jobs)
    for rid, prompt, adapter in jobs:
        assert out[rid][0] == _expected(model, adapters, prompt, adapter), rid
    for i in range(len(PROMPTS)):  # the adapters do change the output
        assert out[f"{i}-None"][0] != out[f"{i}-a"][0] != out[f"{i}-b"][0]
    assert engine.stats().adapters == ("a", "b")


def test_prefix_cache_never_mixes_adapters(tiny_dirs: dict[str, Path],
                                           adapters: dict[str, Path]) -> None:
    model = tiny_dirs["llama"]
    engine = make_engine(model, lora_adapters=adapters)
    prompt = PROMPTS[2]  # 40 tokens: two full blocks of 16
    assert _run(engine, [("base", prompt, None)])["base"][1] == 0
    first_a = _run(engine, [("a1", prompt, "a")])["a1"]
    assert first_a == (_expected(model, adapters, prompt, "a"), 0)  # base blocks not reused
    second_a = _run(engine, [("a2", prompt, "a"), ("b1", prompt, "b")])
    assert second_a["a2"] == (first_a[0], 32)  # its own adapter's blocks are
    assert second_a["b1"] == (_expected(model, adapters, prompt, "b"), 0)
    assert _run(engine, [("base2", prompt, None)])["base2"][1] == 32


def test_budget_evicts_idle_adapters_and_reads_them_back(
    tiny_dirs: dict[str, Path], adapters: dict[str, Path]
) -> None:
    model = tiny_dirs["llama"]
    engine = make_engine(model, lora_adapters={"a": adapters["a"]})
    store = engine.adapters
    a_bytes = store.describe()[0]["bytes"]
    assert isinstance(a_bytes, int) and a_bytes > 0
    store.budget_bytes = a_bytes  # room for "a" only ("b" is larger)
    with pytest.raises(InvalidRequestError, match="LoRA memory budget"):
        store.load("b", adapters["b"])  # bigger than the whole budget
    store.load("a2", adapters["a"])  # same size: evicts idle "a", which stays known
    assert store.names() == ("a", "a2") and store.resident_names() == ("a2",)
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    engine.add_request(GenerateRequest(request_id="r", prompt_token_ids=tuple(PROMPTS[0]),
                                       sampling=sampling, adapter="a"))  # read back
    assert store.resident_names() == ("a",)
    with pytest.raises(InvalidRequestError, match="in use"):
        store.load("a3", adapters["a"])  # "a" serves a request: never evicted
    store.unload("a")  # new requests stop; the running one finishes with it
    with pytest.raises(ModelNotFoundError):
        engine.check_admission(GenerateRequest(request_id="s", prompt_token_ids=(1,),
                                               sampling=sampling, adapter="a"))
    tokens: list[int] = []
    while engine.has_work:
        for chunk in engine.step():
            tokens.extend(chunk.token_ids)
    assert tokens == _expected(model, adapters, PROMPTS[0], "a")
    assert store.names() == ("a2",) and store.resident_names() == ()
    assert store.describe()[0]["resident"] is False


def test_bad_adapters_are_refused_with_the_reason(tiny_dirs: dict[str, Path],
                                                  adapters: dict[str, Path],
                                                  tmp_path: Path) -> None:
    engine = make_engine(tiny_dirs["llama"])
    with pytest.raises(InvalidRequestError, match="adapter_config.json"):
        engine.adapters.load("x", tmp_path)
    with pytest.raises(InvalidRequestError, match="differ from the base model"):
        engine.adapters.load(engine.settings.name, adapters["a"])
    for change, reason in (({"r": 2}, "do not fit the base model"),
                           ({"use_dora": True}, "DoRA"), ({"bias": "all"}, "biases")):
        edited = tmp_path / reason.split()[0]
        shutil.copytree(adapters["a"], edited)
        config = json.loads((edited / "adapter_config.json").read_text())
        (edited / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(InvalidRequestError, match=reason):
            engine.adapters.load("edited", edited)
    with pytest.raises(ModelNotFoundError, match="not loaded"):
        engine.check_admission(GenerateRequest(
            request_id="r", prompt_token_ids=(1, 2), adapter="nope",
            sampling=SamplingParams(max_tokens=2)))


def test_logprobs_are_the_adapters(tiny_dirs: dict[str, Path], adapters: dict[str, Path]
                                   ) -> None:
    """Prompt logprobs come from a forward outside the step: it applies the adapter too."""
    model = tiny_dirs["llama"]
    engine = make_engine(model, lora_adapters=adapters)
    prompt = PROMPTS[1]
    sampling = SamplingParams(max_tokens=2, temperature=0.0, logprobs=1, prompt_logprobs=0)
    engine.add_request(GenerateRequest(request_id="r", prompt_token_ids=tuple(prompt),
                                       sampling=sampling, adapter="b"))
    chunks = []
    while engine.has_work:
        chunks.extend(engine.step())
    with torch.inference_mode():
        logits = peft_model(model, adapters["b"])(torch.tensor([prompt])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)
    got = [lp.logprob for lp in chunks[0].prompt_logprobs[1:]]
    want = [float(expected[i, t]) for i, t in enumerate(prompt[1:])]
    assert got == pytest.approx(want, abs=1e-4)
    first = chunks[0].logprobs[0]
    assert first.logprob == pytest.approx(float(expected[-1].max()), abs=1e-4)
