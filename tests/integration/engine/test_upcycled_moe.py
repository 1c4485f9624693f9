"""An upcycled MoE (`moeflow models upcycle`) computes what its dense source computes.

Unperturbed, every expert is the dense MLP and the top-k weights are renormalised, so each
token's MoE output is sum_j w_j * MLP(x) with sum_j w_j = 1: the dense output up to float
rounding (about 1 ulp per layer). The greedy tokens must be identical, through transformers and
through the engine; with a zero router (uniform top-2 weights of exactly 0.5) the logits are
bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow.checkpoints.upcycle import UpcycleSpec, upcycle
from moeflow.text.tokenizer import TextTokenizer
from tests.reference import hf_chat_ids, hf_greedy, hf_model, make_engine, run_engine

TEXTS = [
    "Hi",
    "The cat sat on the mat and looked at the rain.",
    "Once upon a time there was a small town by a river, and every morning the baker "
    "opened his shop before the sun came up so that the people could buy fresh bread.",
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _logits(model_dir: Path, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits: torch.Tensor = hf_model(model_dir)(torch.tensor([prompt])).logits
    return logits


@pytest.fixture(scope="module")
def tiny_llama_moe(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("upcycled") / "tiny-llama-moe8x2"
    return upcycle(tiny_dirs["llama"], out, UpcycleSpec(num_experts=8, top_k=2, seed=0))


def test_upcycled_tiny_llama_generates_the_dense_tokens(
    tiny_dirs: dict[str, Path], tiny_llama_moe: Path
) -> None:
    dense = tiny_dirs["llama"]
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(tiny_llama_moe, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    prompts = [TextTokenizer.from_dir(dense).encode(t) for t in TEXTS]
    expected = [hf_greedy(dense, p, 20) for p in prompts]
    assert [hf_greedy(tiny_llama_moe, p, 20) for p in prompts] == expected
    engine = make_engine(tiny_llama_moe, block_size=4, max_num_batched_tokens=24)
    outputs, _ = run_engine(engine, prompts, max_tokens=20)
    assert outputs == expected
    for prompt in prompts:  # rounding only: measured max |diff| 2.6e-6 on logits of ~1-10
        diff = (_logits(dense, prompt) - _logits(tiny_llama_moe, prompt)).abs().max().item()
        assert diff < 1e-4
    # the random router really spreads tokens: the agreement is not a one-expert accident
    with torch.inference_mode():
        out = hf_model(tiny_llama_moe)(torch.tensor([prompts[2]]), output_router_logits=True)
    used = {int(e) for layer in out.router_logits for e in layer.topk(2, dim=-1).indices.flatten()}
    assert len(used) >= 6


def test_zero_router_is_bit_exact(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    dense = tiny_dirs["llama"]
    moe = upcycle(dense, tmp_path / "uniform", UpcycleSpec(num_experts=8, top_k=2, router_std=0))
    prompts = [TextTokenizer.from_dir(dense).encode(t) for t in TEXTS]
    for prompt in prompts:
        assert torch.equal(_logits(dense, prompt), _logits(moe, prompt))
    outputs, _ = run_engine(make_engine(moe), prompts, max_tokens=12)
    assert outputs == [hf_greedy(dense, p, 12) for p in prompts]


def test_perturbed_experts_engine_matches_transformers(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    dense = tiny_dirs["llama"]
    moe = upcycle(dense, tmp_path / "noisy", UpcycleSpec(perturb_std=0.05, seed=3))
    prompts = [TextTokenizer.from_dir(dense).encode(t) for t in TEXTS]
    assert not torch.allclose(_logits(dense, prompts[1]), _logits(moe, prompts[1]), atol=1e-3)
    outputs, _ = run_engine(make_engine(moe, block_size=4), prompts, max_tokens=16)
    assert outputs == [hf_greedy(moe, p, 16) for p in prompts]


@pytest.mark.slow
def test_upcycled_smollm2_generates_the_dense_tokens(
    smollm2_dir: Path, upcycled_smollm2_dir: Path
) -> None:
    # 4 experts keep this at ~1.5 GB and ~35 s; 8 experts (2.8 GB) measured the same: identical
    # tokens, max |logit diff| 7.3e-5
    moe = upcycled_smollm2_dir
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Hi"]
    prompts = [hf_chat_ids(smollm2_dir, [{"role": "user", "content": q}]) for q in questions]
    expected = [hf_greedy(smollm2_dir, p, 24) for p in prompts]
    assert [hf_greedy(moe, p, 24) for p in prompts] == expected
    diff = (_logits(smollm2_dir, prompts[0]) - _logits(moe, prompts[0])).abs().max().item()
    assert diff < 1e-3
    engine = make_engine(moe, max_num_batched_tokens=64, kv_cache_bytes=64 * 2**20)
    outputs, _ = run_engine(engine, prompts, max_tokens=24)
    assert outputs == expected
