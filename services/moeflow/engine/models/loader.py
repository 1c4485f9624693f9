"""Load a Hugging Face safetensors checkpoint into a ``DecoderModel``.

Reads every ``*.safetensors`` shard through safetensors' memory map, accepts both the hub layout
of MoE experts (one tensor per expert and projection) and the fused layout of transformers 5
(``experts.gate_up_proj`` [X, 2I, E]), and ties the LM head to the embeddings when the config
says so.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moeflow.engine.kernels import Linear
from moeflow.engine.models.arch import ArchConfig
from moeflow.engine.models.decoder import DecoderLayer, DecoderModel, DenseMLP, MoE


class CheckpointError(ValueError):
    pass


class _Weights:
    def __init__(self, model_dir: Path, dtype: torch.dtype, stack: ExitStack) -> None:
        self._dtype = dtype
        self._handles: dict[str, Any] = {}
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{model_dir} has no *.safetensors files")
        for path in files:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                self._handles[key] = handle

    def has(self, name: str) -> bool:
        return name in self._handles

    def get(self, name: str) -> torch.Tensor:
        handle = self._handles.get(name)
        if handle is None:
            raise CheckpointError(f"checkpoint tensor {name!r} is missing")
        tensor: torch.Tensor = handle.get_tensor(name)
        return tensor.to(self._dtype).contiguous()

    def get_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows `rows` of a stacked tensor, reading only their bytes."""
        handle = self._handles.get(name)
        if handle is None:
            raise CheckpointError(f"checkpoint tensor {name!r} is missing")
        part = handle.get_slice(name)
        if not rows:
            return torch.empty(0)
        return torch.stack([part[r] for r in rows]).to(self._dtype).contiguous()

    def maybe(self, name: str) -> torch.Tensor | None:
        return self.get(name) if self.has(name) else None

    def names(self) -> Iterator[str]:
        return iter(self._handles)


def _gate_up(w: _Weights, prefix: str, gate: str, up: str) -> torch.Tensor:
    return torch.cat([w.get(f"{prefix}.{gate}.weight"), w.get(f"{prefix}.{up}.weight")])


def _dense_mlp(w: _Weights, prefix: str, gate: str, up: str, down: str) -> DenseMLP:
    return DenseMLP(
        gate_up=Linear(_gate_up(w, prefix, gate, up)), down=Linear(w.get(f"{prefix}.{down}.weight"))
    )


def _moe_prefix(arch: ArchConfig, layer_prefix: str) -> tuple[str, tuple[str, str, str]]:
    if arch.model_type == "mixtral":
        return f"{layer_prefix}.block_sparse_moe", ("w1", "w3", "w2")
    return f"{layer_prefix}.mlp", ("gate_proj", "up_proj", "down_proj")


def _experts(
    w: _Weights, arch: ArchConfig, layer_prefix: str, experts: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [len(experts), 2I, E] and down [len(experts), E, I] of the chosen experts."""
    prefix, (gate, up, down_name) = _moe_prefix(arch, layer_prefix)
    if w.has(f"{prefix}.experts.gate_up_proj"):
        return (w.get_rows(f"{prefix}.experts.gate_up_proj", experts),
                w.get_rows(f"{prefix}.experts.down_proj", experts))
    names = [f"{prefix}.experts.{e}" for e in experts]
    if not names:
        return torch.empty(0), torch.empty(0)
    gate_up = torch.stack([_gate_up(w, p, gate, up) for p in names])
    down = torch.stack([w.get(f"{p}.{down_name}.weight") for p in names])
    return gate_up, down


def _moe(w: _Weights, arch: ArchConfig, layer_prefix: str, *, with_experts: bool) -> MoE:
    prefix, _ = _moe_prefix(arch, layer_prefix)
    chosen = range(arch.num_experts) if with_experts else range(0)
    gate_up, down = _experts(w, arch, layer_prefix, chosen)
    shared = None
    shared_gate = None
    if arch.shared_expert_intermediate_size:
        shared = _dense_mlp(w, f"{prefix}.shared_expert", "gate_proj", "up_proj", "down_proj")
        shared_gate = w.get(f"{prefix}.shared_expert_gate.weight")
    return MoE(
        router=w.get(f"{prefix}.gate.weight"),
        gate_up=gate_up,
        down=down,
        top_k=arch.num_experts_per_tok,
        norm_topk_prob=arch.norm_topk_prob,
        shared=shared,
        shared_gate=shared_gate,
    )


ExpertWeights = dict[int, tuple[torch.Tensor, torch.Tensor]]
"""expert id -> (gate_up [2I, E], down [E, I]) of one MoE layer."""


def load_experts(
    model_dir: Path, arch: ArchConfig, experts: Sequence[int], *, dtype: torch.dtype
) -> dict[int, ExpertWeights]:
    """The routed experts `experts` of every MoE layer: layer id -> expert id -> weights.

    What an expert instance holds; reads only those experts' bytes from the memory map."""
    bad = [e for e in experts if not 0 <= e < arch.num_experts]
    if bad:
        raise CheckpointError(f"experts {bad} do not exist: the model has {arch.num_experts}")
    chosen = sorted(set(experts))
    with ExitStack() as stack:
        w = _Weights(model_dir, dtype, stack)
        out: dict[int, ExpertWeights] = {}
        for i in arch.moe_layer_ids:
            gate_up, down = _experts(w, arch, f"model.layers.{i}", chosen)
            out[i] = {e: (gate_up[j], down[j]) for j, e in enumerate(chosen)}
        return out


def load_model(
    model_dir: Path, arch: ArchConfig, *, dtype: torch.dtype, max_len: int,
    with_routed_experts: bool = True,
) -> DecoderModel:
    """The whole model; without routed experts (an attention instance), MoE layers keep their
    router and shared expert and get empty expert tensors."""
    with ExitStack() as stack:
        w = _Weights(model_dir, dtype, stack)
        layers: list[DecoderLayer] = []
        for i in range(arch.num_layers):
            p = f"model.layers.{i}"
            a = f"{p}.self_attn"
            if i in arch.moe_layer_ids:
                mlp: DenseMLP | MoE = _moe(
                    w, arch, p, with_experts=with_routed_experts
                )
            else:
                mlp = _dense_mlp(w, f"{p}.mlp", "gate_proj", "up_proj", "down_proj")
            layers.append(
                DecoderLayer(
                    input_norm=w.get(f"{p}.input_layernorm.weight"),
                    post_norm=w.get(f"{p}.post_attention_layernorm.weight"),
                    qkv=Linear(torch.cat([w.get(f"{a}.{n}_proj.weight") for n in "qkv"])),
                    o_proj=Linear(w.get(f"{a}.o_proj.weight")),
                    qkv_bias=(
                        torch.cat([w.get(f"{a}.{n}_proj.bias") for n in "qkv"])
                        if w.has(f"{a}.q_proj.bias")
                        else None
                    ),
                    q_norm=w.maybe(f"{a}.q_norm.weight") if arch.has_qk_norm else None,
                    k_norm=w.maybe(f"{a}.k_norm.weight") if arch.has_qk_norm else None,
                    mlp=mlp,
                )
            )
        embed = w.get("model.embed_tokens.weight")
        if arch.tie_word_embeddings or not w.has("lm_head.weight"):
            lm_head = embed
        else:
            lm_head = w.get("lm_head.weight")
        return DecoderModel(arch, embed, layers, w.get("model.norm.weight"), Linear(lm_head),
                            max_len)
