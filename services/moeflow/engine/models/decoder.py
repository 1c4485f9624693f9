"""The decoder-only transformer shared by every supported family, as plain tensor code.

Weights are plain tensors and ``kernels.Linear`` products (no nn.Module call overhead on the
hot path). Each op computes what the Hugging Face implementation computes, in the same order of
operations; where a faster kernel runs (the products, decode attention, the fused RMSNorm) only
the order of a sum differs (last-bit differences; tests/integration/engine pins float32 greedy
tokens against ``transformers``). Index legend: T tokens, E hidden size, H heads, K KV heads,
Hd head dim, X experts, k top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moeflow.engine.kernels import Linear
from moeflow.engine.kernels.native import NativeKernels, library
from moeflow.engine.lora import LoraBatch
from moeflow.engine.models import fused_decode
from moeflow.engine.models.arch import ArchConfig
from moeflow.engine.models.attention import AttentionMetadata, paged_attention
from moeflow.engine.models.fused_decode import FusedDecode


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # statistics in float32 whatever the dtype (as transformers does); free for float32 input
    dtype = x.dtype
    x = x.float()
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps)).to(dtype)


def fused_kernels(dtype: torch.dtype) -> NativeKernels | None:
    """The C kernels that fuse norms, RoPE and cache writes (float32 only), or None."""
    return library() if dtype == torch.float32 else None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(arch: ArchConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, Hd], computed exactly as transformers' default rotary embedding."""
    dim = arch.head_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    inv_freq = 1.0 / (arch.rope_theta**exponent)
    positions = torch.arange(max_len, dtype=torch.float)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a gate_up product [n, 2I] (gate columns, then up) -> [n, I]: one
    pass in the C kernels for float32 (within a few ulps of torch's), torch otherwise."""
    kernels = library()
    if kernels is not None and gate_up.dtype == torch.float32 and gate_up.stride(-1) == 1 \
            and gate_up.dim() == 2:
        return kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One routed expert on its tokens: x [n, E], gate_up [2I, E], down [E, I] -> [n, E]."""
    return F.linear(silu_mul(F.linear(x, gate_up)), down)


@dataclass
class DenseMLP:
    gate_up: Linear  # [2I, E]: gate rows then up rows
    down: Linear  # [E, I]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(silu_mul(self.gate_up(x)))


@dataclass
class MoE:
    """Top-k routed experts; optional shared expert with a sigmoid gate (qwen2_moe)."""

    router: torch.Tensor  # [X, E]
    gate_up: torch.Tensor  # [X, 2I, E]
    down: torch.Tensor  # [X, E, I]
    top_k: int
    norm_topk_prob: bool
    shared: DenseMLP | None = None
    shared_gate: torch.Tensor | None = None  # [1, E]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [T, k] and their weights [T, k] for each token."""
        logits = F.linear(x, self.router)
        probs = F.softmax(logits, dtype=torch.float, dim=-1)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        return expert_ids, weights.to(x.dtype)

    def experts(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(x)
        num_experts = self.gate_up.shape[0]
        # [X, k, T] one-hot of which (token, slot) pairs each expert serves
        expert_mask = F.one_hot(expert_ids, num_classes=num_experts).permute(2, 1, 0)
        hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for e in hit:
            slot, token_idx = torch.where(expert_mask[e])
            h = expert_mlp(x[token_idx], self.gate_up[e], self.down[e])
            h = h * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The gated shared expert's output, or None when there is no shared expert."""
        if self.shared is None:
            return None
        assert self.shared_gate is not None
        return torch.sigmoid(F.linear(x, self.shared_gate)) * self.shared(x)

    def add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the routed experts' sum) plus the gated shared expert, if there is one."""
        shared = self.shared_output(x)
        return out if shared is None else out + shared

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        expert_ids, weights = self.route(x)
        return self.add_shared(x, self.experts(x, expert_ids, weights))


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Linear  # [(H + 2K) * Hd, E]: q rows, then k, then v
    o_proj: Linear  # [E, H * Hd]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    mlp: DenseMLP | MoE


class DecoderModel:
    """Embeddings -> layers -> final norm; ``logits`` applies the LM head to chosen rows."""

    def __init__(
        self,
        arch: ArchConfig,
        embed: torch.Tensor,
        layers: list[DecoderLayer],
        final_norm: torch.Tensor,
        lm_head: Linear,
        max_len: int,
    ) -> None:
        self.arch = arch
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.cos, self.sin = rope_tables(arch, max_len)
        self.cos = self.cos.to(embed.dtype)
        self.sin = self.sin.to(embed.dtype)
        self.scale = arch.head_dim**-0.5
        self.lora: LoraBatch | None = None
        """This forward's LoRA adapters (set by the runner around a step), or None."""

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, Hd] for the tokens at ``positions``."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x + delta`` (``x`` without a delta) and its RMSNorm with ``weight``: one fused
        call for float32 when the C kernels are built, else the torch ops."""
        kernels = fused_kernels(x.dtype)
        if kernels is not None:
            return kernels.add_rms_norm(x, delta, weight, self.arch.rms_norm_eps)
        if delta is not None:
            x = x + delta
        return x, rms_norm(x, weight, self.arch.rms_norm_eps)

    def attention(
        self,
        i: int,
        h: torch.Tensor,  # [T, E]: the layer's normed input
        cos: torch.Tensor,  # [T, 1, Hd]
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:  # [T, E]: layer i's attention output, after o_proj
        """QKV, RoPE, paged attention (writing this step's K/V into the cache), o_proj."""
        arch = self.arch
        layer = self.layers[i]
        num_tokens = h.shape[0]
        heads = [arch.num_heads, arch.num_kv_heads, arch.num_kv_heads]
        qkv = layer.qkv(h)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        lora = self.lora
        if lora is not None:
            qkv = lora.add(i, "qkv", h, qkv)
        kernels = fused_kernels(qkv.dtype) if layer.q_norm is None else None
        if kernels is not None:
            # RoPE and the K/V cache writes in one call, the same arithmetic as below
            qk = kernels.rope_store(
                qkv, cos.view(num_tokens, -1), sin.view(num_tokens, -1), kv_cache[i, 0],
                kv_cache[i, 1], meta.slot_mapping, arch.num_heads, arch.num_kv_heads,
                arch.head_dim)
            v = qkv.view(num_tokens, -1, arch.head_dim)[:, heads[0] + heads[1] :]
            stored = True
        else:
            qkv3 = qkv.view(num_tokens, -1, arch.head_dim)
            q, k, v = qkv3.split(heads, dim=1)
            if layer.q_norm is not None and layer.k_norm is not None:
                q = rms_norm(q, layer.q_norm, arch.rms_norm_eps)
                k = rms_norm(k, layer.k_norm, arch.rms_norm_eps)
                qk = torch.cat((q, k), dim=1)
            else:
                qk = qkv3[:, : heads[0] + heads[1]]
            # RoPE on q and k together: the same elementwise ops, half the dispatches
            qk = (qk * cos) + (rotate_half(qk) * sin)
            stored = False
        q, k = qk.split(heads[:2], dim=1)
        attn = paged_attention(q, k, v, kv_cache[i, 0], kv_cache[i, 1], meta, self.scale,
                               stored=stored)
        attn = attn.reshape(num_tokens, -1)
        if lora is not None:
            return lora.add(i, "o_proj", attn, layer.o_proj(attn))
        return layer.o_proj(attn)

    def attention_block(
        self,
        i: int,
        x: torch.Tensor,  # [T, E]
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:  # [T, E]: x plus layer i's attention output
        """Layer i up to its MLP: norm, then ``attention``, then the residual add."""
        _, h = self.add_norm(x, None, self.layers[i].input_norm)
        return x + self.attention(i, h, cos, sin, meta, kv_cache)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_fused", None)  # raw addresses: rebuilt where the model is loaded
        return state

    def fused_decode(self) -> FusedDecode | None:
        """The plan that runs a decode-only step's layers in one C call, or None (built once;
        ``models/fused_decode.py`` says when it applies)."""
        if "_fused" not in self.__dict__:
            self._fused = fused_decode.build(self)
        return self._fused

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,  # [layers, 2, S, K, Hd]
    ) -> torch.Tensor:  # [T, E]
        cos, sin = self.rope(positions)
        fused = self.fused_decode() if self.lora is None else None
        if fused is not None and fused.applies(int(input_ids.shape[0]), meta, kv_cache):
            return fused(input_ids, cos, sin, meta, kv_cache, self.scale)
        layers = self.layers
        # each residual add is fused with the norm that follows it (the next layer's input
        # norm, or the final norm): x + attn -> post norm, x + mlp -> next norm
        x, h = self.add_norm(F.embedding(input_ids, self.embed), None, layers[0].input_norm)
        for i, layer in enumerate(layers):
            x, h = self.add_norm(x, self.attention(i, h, cos, sin, meta, kv_cache),
                                 layer.post_norm)
            following = layers[i + 1].input_norm if i + 1 < len(layers) else self.final_norm
            lora = self.lora
            mlp = layer.mlp
            out = (layer.mlp(h) if lora is None or not isinstance(mlp, DenseMLP)
                   else self._lora_mlp(lora, i, mlp, h))
            x, h = self.add_norm(x, out, following)
        return h

    @staticmethod
    def _lora_mlp(lora: LoraBatch, i: int, mlp: DenseMLP, h: torch.Tensor) -> torch.Tensor:
        """``DenseMLP.__call__`` with layer i's adapter updates added to both products."""
        act = silu_mul(lora.add(i, "gate_up", h, mlp.gate_up(h)))
        return lora.add(i, "down", act, mlp.down(act))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
