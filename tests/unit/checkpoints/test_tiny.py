"""Tiny random checkpoints: load with real transformers, tokenizer contract, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeflow.checkpoints.tiny import TINY_ARCHS, make_tiny, tiny_dir_name
from moeflow.checkpoints.tiny_tokenizer import ENDOFTEXT, IM_END, IM_START

torch.set_num_threads(1)

EXPECTED_FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "moeflow.json",
}
CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is the capital of France?"},
]


def _is_printable(text: str) -> bool:
    if not text or "\ufffd" in text:
        return False
    return all(char.isprintable() or char in " \t\n\r" for char in text)


def _safetensors_keys(checkpoint_dir: Path) -> set[str]:
    with safe_open(str(checkpoint_dir / "model.safetensors"), "pt") as handle:
        return set(handle.keys())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_files_and_metadata(tiny_dirs: dict[str, Path], arch: str) -> None:
    checkpoint_dir = tiny_dirs[arch]
    assert checkpoint_dir.name == tiny_dir_name(arch)
    assert {path.name for path in checkpoint_dir.iterdir()} >= EXPECTED_FILES
    metadata = json.loads((checkpoint_dir / "moeflow.json").read_text())
    assert metadata["source"] == f"tiny:{arch}"
    assert metadata["architecture"] == arch
    assert metadata["name"] == checkpoint_dir.name
    assert isinstance(metadata["created_unix"], int)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, local_files_only=True)
    assert metadata["num_params"] == sum(param.numel() for param in model.parameters())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_loads_with_hf_and_vocab_matches(tiny_dirs: dict[str, Path], arch: str) -> None:
    checkpoint_dir = tiny_dirs[arch]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, local_files_only=True)
    config = model.config
    assert config.model_type == arch
    assert config.vocab_size == len(tokenizer) == 512
    assert config.hidden_size == 64
    assert config.num_attention_heads == 4 and config.num_key_value_heads == 2
    assert config.tie_word_embeddings is (arch == "llama")
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.eos_token_id == eos_id
    assert config.eos_token_id == eos_id
    assert model.generation_config.eos_token_id == eos_id
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    assert tokenizer.pad_token_id == config.pad_token_id == pad_id
    assert tokenizer.convert_tokens_to_ids(IM_START) == 1
    assert tokenizer.bos_token_id is None


def test_every_token_decodes_printable(tiny_dirs: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"], local_files_only=True)
    bad = {
        token_id: tokenizer.decode([token_id])
        for token_id in range(len(tokenizer))
        if not _is_printable(tokenizer.decode([token_id]))
    }
    assert bad == {}


def test_round_trip_and_unknown_text(tiny_dirs: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["qwen3_moe"], local_files_only=True)
    text = "Hello, world!\n\tThe capital of France is Paris. 2048 + 42 = ?"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text)  # merges were learned
    unknown_ids = tokenizer("café").input_ids
    assert tokenizer.unk_token_id in unknown_ids


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_chat_template_and_greedy_generate(tiny_dirs: dict[str, Path], arch: str) -> None:
    checkpoint_dir = tiny_dirs[arch]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, local_files_only=True)
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_gen_prompt = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert not no_gen_prompt.endswith("assistant\n")
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, local_files_only=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 8


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_deterministic_per_seed(tiny_dirs: dict[str, Path], arch: str, tmp_path: Path) -> None:
    again = make_tiny(arch, tmp_path / "again", seed=0)
    other = make_tiny(arch, tmp_path / "other", seed=1)
    reference = (tiny_dirs[arch] / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == reference
    assert (again / "tokenizer.json").read_bytes() == (
        tiny_dirs[arch] / "tokenizer.json"
    ).read_bytes()
    assert (other / "model.safetensors").read_bytes() != reference


def test_weight_layout(tiny_dirs: dict[str, Path]) -> None:
    assert "lm_head.weight" not in _safetensors_keys(tiny_dirs["llama"])  # tied
    for arch in ("qwen3_moe", "mixtral", "qwen2_moe"):
        assert "lm_head.weight" in _safetensors_keys(tiny_dirs[arch])
    qwen2 = _safetensors_keys(tiny_dirs["qwen2_moe"])
    for layer in (0, 2):
        assert f"model.layers.{layer}.mlp.experts.7.up_proj.weight" in qwen2
        assert f"model.layers.{layer}.mlp.shared_expert_gate.weight" in qwen2
    assert "model.layers.1.mlp.gate_proj.weight" in qwen2  # the dense layer
    assert not any(key.startswith("model.layers.1.mlp.experts.") for key in qwen2)
    config = json.loads((tiny_dirs["qwen3_moe"] / "config.json").read_text())
    assert config["norm_topk_prob"] is True


def test_greedy_logits_are_not_near_ties(tiny_dirs: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen3_moe"], local_files_only=True)
    with torch.no_grad():
        logits = model(torch.arange(3, 40).unsqueeze(0)).logits[0]
    assert logits.std().item() > 0.5


def test_unknown_arch_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny arch"):
        make_tiny("gpt2", tmp_path / "x")
