"""Attention over a paged KV cache, and the per-step metadata that drives it.

Index legend: T = tokens in the step (all sequences flattened), D = decoding sequences (one new
token each; they come first in T), L = longest context among them, H = query heads,
K = KV heads, Hd = head dim, S = cache slots (num_blocks * block_size), B = most blocks of a
decoding sequence.

Numerics follow Hugging Face's SDPA path on purpose (``enable_gqa``, explicit ``scale``, causal
prefill without a mask) so that float32 greedy decoding reproduces ``transformers`` exactly.
Float32 decode runs the C kernel (``kernels/csrc/paged_attention.c``) when this machine has it:
it reads each context in place from the cache, with the arithmetic of ATen's CPU flash
attention (what SDPA runs); the torch path gathers a copy of every context first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moeflow.engine.kernels.native import NativeKernels, library


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
    block_size: int = 0
    decode_block_tables: torch.Tensor | None = None  # [D, B] int32 block ids, padded with 0
    decode_lens: torch.Tensor | None = None  # [D] int32 context lengths, this token included
    # the torch path only (None: the C kernel reads the cache through the block tables)
    decode_gather: torch.Tensor | None = None  # [D, L] slot ids, padded
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, L] bool, None when no padding
    prefills: list[PrefillSpan] = field(default_factory=list)


def decode_kernel(dtype: torch.dtype) -> NativeKernels | None:
    """The C decode-attention kernel for a KV cache of ``dtype``, or None (torch path)."""
    return library() if dtype == torch.float32 else None


def decode_gather(
    block_tables: torch.Tensor, lens: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch path's slot ids [D, L] of each decoding context (padding reads a slot of the
    sequence's first block, masked out) and its mask [D, 1, 1, L] (None without padding)."""
    max_len = int(lens.max())
    pos = torch.arange(max_len)
    gather = block_tables[:, pos // block_size].long() * block_size + pos % block_size
    if int(lens.min()) == max_len:
        return gather, None
    mask = pos[None, :] < lens[:, None]
    return gather, mask[:, None, None, :]


def _decode(
    q: torch.Tensor,  # [D, H, Hd]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [D, H, Hd]
    if meta.decode_gather is None:
        kernel = decode_kernel(q.dtype)
        assert kernel is not None, "no decode_gather, and no C kernel to read block tables"
        assert meta.decode_block_tables is not None and meta.decode_lens is not None
        return kernel.paged_decode_attention(
            q, k_cache, v_cache, meta.decode_block_tables, meta.decode_lens, meta.block_size,
            scale)
    kd = k_cache[meta.decode_gather].transpose(1, 2)  # [D, K, L, Hd]
    vd = v_cache[meta.decode_gather].transpose(1, 2)
    od = F.scaled_dot_product_attention(
        q.unsqueeze(2), kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
    return od.squeeze(2)


def paged_attention(
    q: torch.Tensor,  # [T, H, Hd]
    k: torch.Tensor,  # [T, K, Hd]
    v: torch.Tensor,  # [T, K, Hd]
    k_cache: torch.Tensor,  # [S, K, Hd]
    v_cache: torch.Tensor,  # [S, K, Hd]
    meta: AttentionMetadata,
    scale: float,
    *,
    stored: bool = False,
) -> torch.Tensor:  # [T, H, Hd]
    """Attention of every token of the step; writes this step's K/V into the cache first,
    unless the caller already did (``stored``)."""
    if not stored:
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
    num_decode = meta.num_decode_tokens
    decoded = _decode(q[:num_decode], k_cache, v_cache, meta, scale) if num_decode else None
    if decoded is not None and not meta.prefills:
        return decoded
    out = torch.empty(q.shape, dtype=q.dtype)
    if decoded is not None:
        out[:num_decode] = decoded
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
