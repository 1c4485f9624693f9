"""Reference outputs from Hugging Face transformers, and a driver for the in-process engine."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from moeflow.domain.messages import GenerateRequest, SamplingParams
from moeflow.engine.config import EngineSettings
from moeflow.engine.llm_engine import LLMEngine


@lru_cache(maxsize=4)
def hf_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def hf_greedy(model_dir: Path, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate, one prompt at a time (no padding effects)."""
    model = hf_model(model_dir)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([list(prompt_ids)]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def hf_chat_ids(model_dir: Path, messages: list[dict[str, str]]) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def make_engine(model_dir: Path, **overrides: Any) -> LLMEngine:
    settings = EngineSettings(
        model_path=model_dir,
        num_threads=overrides.pop("num_threads", 1),
        kv_cache_bytes=overrides.pop("kv_cache_bytes", 32 * 1024 * 1024),
        max_model_len=overrides.pop("max_model_len", 512),
        **overrides,
    )
    return LLMEngine(settings)


def run_engine(
    engine: LLMEngine,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    *,
    prefix: str = "r",
) -> tuple[list[list[int]], list[int]]:
    """Admit every prompt at once (continuous batching), step to the end.

    Returns the generated token ids per prompt and the cached-prefix token count per prompt.
    """
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ids = [f"{prefix}{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(
            GenerateRequest(request_id=rid, prompt_token_ids=tuple(prompt), sampling=sampling)
        )
    outputs: dict[str, list[int]] = {rid: [] for rid in ids}
    cached: dict[str, int] = dict.fromkeys(ids, 0)
    num_steps = 0
    while engine.has_work:
        num_steps += 1
        assert num_steps < 10_000, "engine did not finish"
        for chunk in engine.step():
            outputs[chunk.request_id].extend(chunk.token_ids)
            cached[chunk.request_id] = chunk.num_cached_tokens
    return [outputs[r] for r in ids], [cached[r] for r in ids]
