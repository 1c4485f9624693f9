"""Tiny random Hugging Face checkpoints for tests: `make_tiny(arch, out_dir, seed)`.

Contract:
- `arch` is one of `TINY_ARCHS`: "llama", "qwen3_moe", "mixtral", "qwen2_moe" (defined in the
  torch-free `registry`, re-exported here with `tiny_dir_name`).
- Writes into out_dir (created if needed; files of the same name are overwritten, others left):
  config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json,
  chat_template.jinja (ChatML) and moeflow.json (source "tiny:<arch>"). Returns out_dir.
- Deterministic: the same (arch, seed) gives byte-identical model.safetensors and tokenizer.json.
- Shapes: hidden 64, 4 query heads, 2 KV heads, head_dim 16, dense intermediate 128, 2 layers
  (qwen2_moe: 3 layers, layer 1 dense via `mlp_only_layers=[1]`); MoE: 8 experts, top-2,
  moe_intermediate_size 64 (mixtral: experts use intermediate_size 128, as its config defines);
  qwen2_moe keeps a shared expert (intermediate 64, sigmoid-gated); qwen3_moe has
  norm_topk_prob=True, qwen2_moe keeps its default False. rope_theta 10000, 2048 positions.
  Only llama ties lm_head to the embedding (as SmolLM2 does).
- Weights are drawn with std `INIT_STD` (10x the HF default) so greedy logits are not near-ties.
- Vocab: `config.vocab_size == len(tokenizer)` (512); eos is <|im_end|> in the tokenizer,
  config.json and generation_config.json; pad is <|endoftext|>; no bos.
- Loads offline with `AutoTokenizer.from_pretrained(out_dir)` and
  `AutoModelForCausalLM.from_pretrained(out_dir)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from moeflow.checkpoints.metadata import write_metadata
from moeflow.checkpoints.registry import TINY_ARCHS, tiny_dir_name
from moeflow.checkpoints.tiny_tokenizer import ENDOFTEXT, IM_END, train_tiny_tokenizer

__all__ = ["TINY_ARCHS", "make_tiny", "tiny_config", "tiny_dir_name"]

INIT_STD: Final = 0.2
HIDDEN_SIZE: Final = 64
NUM_ATTENTION_HEADS: Final = 4
NUM_KV_HEADS: Final = 2
HEAD_DIM: Final = 16
INTERMEDIATE_SIZE: Final = 128
MOE_INTERMEDIATE_SIZE: Final = 64
NUM_EXPERTS: Final = 8
NUM_EXPERTS_PER_TOKEN: Final = 2
MAX_POSITION_EMBEDDINGS: Final = 2048
ROPE_THETA: Final = 10000.0


def _arch_kwargs(arch: str) -> dict[str, Any]:
    if arch == "llama":
        return {"num_hidden_layers": 2, "head_dim": HEAD_DIM, "tie_word_embeddings": True}
    if arch == "qwen3_moe":
        return {
            "num_hidden_layers": 2,
            "num_experts": NUM_EXPERTS,
            "num_experts_per_tok": NUM_EXPERTS_PER_TOKEN,
            "moe_intermediate_size": MOE_INTERMEDIATE_SIZE,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    if arch == "mixtral":
        return {
            "num_hidden_layers": 2,
            "head_dim": HEAD_DIM,
            "num_local_experts": NUM_EXPERTS,
            "num_experts_per_tok": NUM_EXPERTS_PER_TOKEN,
        }
    if arch == "qwen2_moe":
        return {
            "num_hidden_layers": 3,
            "num_experts": NUM_EXPERTS,
            "num_experts_per_tok": NUM_EXPERTS_PER_TOKEN,
            "moe_intermediate_size": MOE_INTERMEDIATE_SIZE,
            "shared_expert_intermediate_size": MOE_INTERMEDIATE_SIZE,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [1],
        }
    raise ValueError(f"unknown tiny arch {arch!r}; choose one of {', '.join(TINY_ARCHS)}")


def tiny_config(arch: str, vocab_size: int, eos_token_id: int, pad_token_id: int) -> Any:
    """The transformers config for a tiny `arch` model (see the module docstring for shapes)."""
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_attention_heads": NUM_ATTENTION_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "initializer_range": INIT_STD,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    kwargs.update(_arch_kwargs(arch))
    config = AutoConfig.for_model(arch, **kwargs)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim != HEAD_DIM:
        raise AssertionError(f"{arch}: head_dim {head_dim} != {HEAD_DIM}")
    return config


def _count_unique_params(model: torch.nn.Module) -> int:
    # parameters() yields a tied tensor once, so a tied embedding / lm_head counts once.
    return sum(param.numel() for param in model.parameters())


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):
        raise TypeError(f"expected one id for {token!r}, got {token_id!r}")
    return token_id


def make_tiny(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random `arch` checkpoint with its tokenizer into out_dir; return out_dir."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    tokenizer = train_tiny_tokenizer()
    eos_id = _token_id(tokenizer, IM_END)
    pad_id = _token_id(tokenizer, ENDOFTEXT)
    config: PretrainedConfig = tiny_config(arch, len(tokenizer), eos_id, pad_id)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_metadata(
        out_dir,
        name=out_dir.name,
        source=f"tiny:{arch}",
        architecture=arch,
        num_params=_count_unique_params(model),
    )
    return out_dir
