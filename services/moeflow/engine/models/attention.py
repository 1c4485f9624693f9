"""Attention over a paged KV cache, and the per-step metadata that drives it.

Index legend: T = tokens in the step (all sequences flattened), D = decoding sequences (one new
token each; they come first in T), L = longest context among them, H = query heads,
K = KV heads, Hd = head dim, S = cache slots (num_blocks * block_size).

Numerics follow Hugging Face's SDPA path on purpose (``enable_gqa``, explicit ``scale``, causal
prefill without a mask) so that float32 greedy decoding reproduces ``transformers`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """Tokens [q_start, q_end) of one sequence that has ``q_end - q_start`` > 1 new tokens.

    ``gather`` holds the cache slots of its whole context (earlier chunks or prefix-cache hits
    plus this chunk) when there is earlier context; None means the chunk is the whole context.
    """

    q_start: int
    q_end: int
    gather: torch.Tensor | None = None  # [ctx] slot ids
    mask: torch.Tensor | None = None  # [q, ctx] bool, True = attend


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    num_decode_tokens: int = 0
    decode_gather: torch.Tensor | None = None  # [D, L] slot ids, padded
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, L] bool, None when no padding
    prefills: list[PrefillSpan] = field(default_factory=list)


def paged_attention(
    q: torch.Tensor,  # [T, H, Hd]
    k: torch.Tensor,  # [T, K, Hd]
    v: torch.Tensor,  # [T, K, Hd]
    k_cache: torch.Tensor,  # [S, K, Hd]
    v_cache: torch.Tensor,  # [S, K, Hd]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, Hd]
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    num_decode = meta.num_decode_tokens
    if num_decode:
        assert meta.decode_gather is not None
        kd = k_cache[meta.decode_gather].transpose(1, 2)  # [D, K, L, Hd]
        vd = v_cache[meta.decode_gather].transpose(1, 2)
        qd = q[:num_decode].unsqueeze(2)  # [D, H, 1, Hd]
        od = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True
        )
        out[:num_decode] = od.squeeze(2)
    for span in meta.prefills:
        qs = q[span.q_start : span.q_end].transpose(0, 1).unsqueeze(0)  # [1, H, q, Hd]
        if span.gather is None:
            ks = k[span.q_start : span.q_end]
            vs = v[span.q_start : span.q_end]
        else:
            ks = k_cache[span.gather]
            vs = v_cache[span.gather]
        ks = ks.transpose(0, 1).unsqueeze(0)  # [1, K, ctx, Hd]
        vs = vs.transpose(0, 1).unsqueeze(0)
        os_ = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            attn_mask=span.mask,
            is_causal=span.mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[span.q_start : span.q_end] = os_.squeeze(0).transpose(0, 1)
    return out
