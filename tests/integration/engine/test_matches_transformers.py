"""The engine's float32 greedy tokens equal Hugging Face transformers' `generate`, token for token,
whatever the batching: prompts of different lengths run concurrently, long prompts are
prefilled in chunks, shared prefixes come from the cache, and memory pressure forces preemption.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow.text.tokenizer import TextTokenizer
from tests.reference import hf_chat_ids, hf_greedy, make_engine, run_engine

ARCHS = ["llama", "qwen3_moe", "mixtral", "qwen2_moe"]
TEXTS = [
    "Hi",
    "The cat sat on the mat and looked at the rain.",
    "Once upon a time there was a small town by a river, and every morning the baker "
    "opened his shop before the sun came up so that the people could buy fresh bread.",
    "Numbers: one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen twenty, and then we stop counting "
    "because the teacher rings the bell and everybody runs outside to play in the yard.",
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _prompts(model_dir: Path) -> list[list[int]]:
    tokenizer = TextTokenizer.from_dir(model_dir)
    return [tokenizer.encode(t) for t in TEXTS]


@pytest.mark.parametrize("arch", ARCHS)
def test_concurrent_chunked_batch_matches_transformers_greedy(
    tiny_dirs: dict[str, Path], arch: str
) -> None:
    model_dir = tiny_dirs[arch]
    prompts = _prompts(model_dir)
    assert len({len(p) for p in prompts}) == len(prompts), "prompts must differ in length"
    engine = make_engine(model_dir, block_size=4, max_num_batched_tokens=24)
    outputs, _ = run_engine(engine, prompts, max_tokens=20)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == hf_greedy(model_dir, prompt, 20)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_shared_prefix_comes_from_cache_and_changes_nothing(
    tiny_dirs: dict[str, Path], arch: str
) -> None:
    model_dir = tiny_dirs[arch]
    tokenizer = TextTokenizer.from_dir(model_dir)
    shared = tokenizer.encode(TEXTS[3])
    prompts = [shared + tokenizer.encode(tail) for tail in (" The end.", " Why?", " Yes")]
    engine = make_engine(model_dir, block_size=8)
    first, cached_first = run_engine(engine, prompts[:1], max_tokens=12, prefix="a")
    rest, cached_rest = run_engine(engine, prompts[1:], max_tokens=12, prefix="b")
    assert cached_first == [0]
    full_blocks = (len(shared) // 8) * 8
    assert all(c >= full_blocks for c in cached_rest), cached_rest
    for prompt, output in zip(prompts, first + rest, strict=True):
        assert output == hf_greedy(model_dir, prompt, 12)


def test_preemption_under_memory_pressure_loses_nothing(tiny_dirs: dict[str, Path]) -> None:
    model_dir = tiny_dirs["llama"]
    tokenizer = TextTokenizer.from_dir(model_dir)
    words = ["red", "blue", "green", "yellow", "black", "white"]
    prompts = [tokenizer.encode(f"{TEXTS[1]} The {w} one.") for w in words]
    # 2 layers x 2 KV heads x 16 dims x K,V x 4 bytes = 512 B/token; 4-token blocks are 2 KiB.
    engine = make_engine(
        model_dir, block_size=4, kv_cache_bytes=56 * 2048, max_model_len=200,
        enable_prefix_caching=False,
    )
    outputs, _ = run_engine(engine, prompts, max_tokens=40)
    assert engine.scheduler.num_preemptions_total > 0, "the test must exercise preemption"
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == hf_greedy(model_dir, prompt, 40)


@pytest.mark.slow
def test_smollm2_chat_batch_matches_transformers_greedy(smollm2_dir: Path) -> None:
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea and the wind and a lonely sailor out there at night.",
        "Hi",
        "Explain gravity in one sentence.",
    ]
    prompts = [hf_chat_ids(smollm2_dir, [{"role": "user", "content": q}]) for q in questions]
    tokenizer = TextTokenizer.from_dir(smollm2_dir)
    for q, ids in zip(questions, prompts, strict=True):
        rendered = tokenizer.render_chat([{"role": "user", "content": q}])
        assert tokenizer.encode(rendered) == ids, "gateway templating must equal transformers'"
    engine = make_engine(smollm2_dir, max_num_batched_tokens=64, kv_cache_bytes=64 * 2**20)
    outputs, _ = run_engine(engine, prompts, max_tokens=24)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == hf_greedy(smollm2_dir, prompt, 24)
    # and again, now that the shared system prompt is in the prefix cache
    again, cached = run_engine(engine, prompts, max_tokens=24, prefix="again")
    assert again == outputs
    assert min(cached) > 0


def test_bfloat16_halves_kv_bytes_and_generates(tiny_dirs: dict[str, Path]) -> None:
    """bfloat16 is the fast option, not the exact one: it must run and stay close to float32."""
    model_dir = tiny_dirs["llama"]
    prompts = _prompts(model_dir)[:3]
    fp32 = make_engine(model_dir, kv_cache_bytes=2**20, max_model_len=256)
    bf16 = make_engine(model_dir, dtype="bfloat16", kv_cache_bytes=2**20, max_model_len=256)
    assert bf16.runner.kv_cache.dtype == torch.bfloat16
    assert bf16.block_manager.num_blocks == 2 * fp32.block_manager.num_blocks
    exact, _ = run_engine(fp32, prompts, max_tokens=8)
    fast, _ = run_engine(bf16, prompts, max_tokens=8)
    assert [len(o) for o in fast] == [len(o) for o in exact]
    # the first token of each prompt survives bfloat16 rounding on this model
    assert [o[0] for o in fast] == [o[0] for o in exact]
