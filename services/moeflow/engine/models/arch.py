"""What the engine needs to know about a checkpoint's architecture, read from config.json.

Supported families share one decoder shape (pre-norm attention + MLP/MoE, RoPE, GQA):
Llama-family dense models (llama, mistral, qwen2, qwen3), and the MoE families qwen2_moe
(shared expert with a sigmoid gate), qwen3_moe (QK-norm) and mixtral.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_DENSE = {"llama", "mistral", "qwen2", "qwen3"}
_MOE = {"qwen2_moe", "qwen3_moe", "mixtral"}
SUPPORTED_MODEL_TYPES = frozenset(_DENSE | _MOE)


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    has_qkv_bias: bool
    has_qk_norm: bool
    eos_token_ids: tuple[int, ...]
    # MoE (num_experts == 0 for dense models)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layer_ids: tuple[int, ...] = ()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, all layers, float32."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4


def _rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported yet")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    return float(theta)


def _eos_ids(raw: dict[str, Any], model_dir: Path) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (raw, _read_json(model_dir / "generation_config.json")):
        value = source.get("eos_token_id")
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list):
            ids.extend(int(v) for v in value)
    return tuple(dict.fromkeys(ids))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def load_arch(model_dir: Path) -> ArchConfig:
    raw = _read_json(model_dir / "config.json")
    if not raw:
        raise UnsupportedModelError(f"{model_dir} has no config.json")
    model_type = raw.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: "
            + ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        )
    if raw.get("use_sliding_window"):
        raise UnsupportedModelError("sliding-window attention is not supported yet")
    hidden = int(raw["hidden_size"])
    num_heads = int(raw["num_attention_heads"])
    num_layers = int(raw["num_hidden_layers"])
    moe: dict[str, Any] = {}
    if model_type in _MOE:
        num_experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
        sparse_step = int(raw.get("decoder_sparse_step") or 1)
        dense_only = set(raw.get("mlp_only_layers") or [])
        moe = {
            "num_experts": num_experts,
            "num_experts_per_tok": int(raw["num_experts_per_tok"]),
            "moe_intermediate_size": int(
                raw.get("moe_intermediate_size") or raw["intermediate_size"]
            ),
            "norm_topk_prob": True
            if model_type == "mixtral"
            else bool(raw.get("norm_topk_prob", False)),
            "shared_expert_intermediate_size": int(
                raw.get("shared_expert_intermediate_size") or 0
            )
            if model_type == "qwen2_moe"
            else 0,
            "moe_layer_ids": tuple(
                i
                for i in range(num_layers)
                if i not in dense_only and num_experts > 0 and (i + 1) % sparse_step == 0
            ),
        }
    has_qkv_bias = bool(raw.get("attention_bias", False)) or model_type in ("qwen2", "qwen2_moe")
    if model_type == "qwen2_moe" and raw.get("qkv_bias") is False:
        has_qkv_bias = False
    return ArchConfig(
        model_type=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(raw.get("head_dim") or hidden // num_heads),
        intermediate_size=int(raw["intermediate_size"]),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(raw),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        has_qkv_bias=has_qkv_bias,
        has_qk_norm=model_type in ("qwen3", "qwen3_moe"),
        eos_token_ids=_eos_ids(raw, model_dir),
        **moe,
    )
