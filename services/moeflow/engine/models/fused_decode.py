"""A decode-only step's decoder layers in one C call (``kernels/csrc/decoder.c``).

Batch-1 decode streams every weight once per step, so its speed is the memory's pace as long as
nothing else runs between the products. With every kernel in C, the Python between the ~9 calls
of each layer (checks, allocations, ctypes conversions, views) was still ~4.6 ms of a ~25 ms
SmolLM2 step on a 2-core EPYC. Here the layer loop runs in C: the same kernels, in the same
order, with the same arguments and thread count as ``DecoderModel.forward``'s own path, so the
hidden states are bit-identical to it (``tests/unit/engine/test_fused_decode.py``).

It applies to float32 dense models whose layers have no QKV bias and no Q/K norm (Llama,
Mistral, SmolLM2 and the like), to steps where every token is a decoding sequence and no LoRA
adapter is active, and only where every product takes the C loop at that batch size
(``Linear.c_loop_rows``). Every other step, and every model when ``MOEFLOW_FUSED_DECODE=0``
or without the C kernels, runs the Python path.

A plan holds the weights' addresses; ``DecoderModel`` never changes its layers after it is
built, and the plan keeps the weights it points at alive.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from moeflow.engine.kernels.native import NativeKernels, library
from moeflow.engine.models.arch import ArchConfig
from moeflow.engine.models.attention import AttentionMetadata

ENV_SWITCH = "MOEFLOW_FUSED_DECODE"
"""``0`` keeps decode steps on the per-layer Python path (for A/B measurements)."""


class FusedDecode:
    """The plan for one model: weight addresses and packings, and the batch sizes it covers."""

    def __init__(self, kernels: NativeKernels, arch: ArchConfig, embed: torch.Tensor,
                 norms: list[tuple[torch.Tensor, torch.Tensor]], final_norm: torch.Tensor,
                 products: list[tuple[torch.Tensor, ...]], packing: list[int], max_rows: int,
                 intermediate: int) -> None:
        self._kernels = kernels
        self._arch = arch
        self._embed = embed
        self._final_norm = final_norm
        self._keep = (norms, products)  # the tensors the addresses below point into
        addresses = []
        for (input_norm, post_norm), weights in zip(norms, products, strict=True):
            addresses += [input_norm.data_ptr(), post_norm.data_ptr(),
                          *(w.data_ptr() for w in weights)]
        self._weights = torch.tensor(addresses, dtype=torch.int64)
        self._packing = torch.tensor(packing, dtype=torch.int64)
        self.max_rows = max_rows
        """The largest decode batch every product of the model runs in the C loop."""
        self._intermediate = intermediate
        hd, heads, kv_heads = arch.head_dim, arch.num_heads, arch.num_kv_heads
        self._scratch_per_token = ((heads + 2 * kv_heads) * hd + (heads + kv_heads) * hd
                                   + heads * hd + arch.hidden_size + 3 * intermediate)
        """Floats of ``decoder.c``'s scratch per token: qkv, qk, attention, delta, gate_up, act."""

    def applies(self, num_tokens: int, meta: AttentionMetadata, kv_cache: torch.Tensor) -> bool:
        """Whether this step can run here: decode tokens only, read through block tables."""
        return (0 < num_tokens <= self.max_rows and not meta.prefills
                and meta.num_decode_tokens == num_tokens and meta.decode_gather is None
                and meta.decode_block_tables is not None and meta.decode_lens is not None
                and kv_cache.dtype == torch.float32 and kv_cache.is_contiguous())

    def __call__(
        self,
        input_ids: torch.Tensor,  # [T]
        cos: torch.Tensor,  # [T, 1, Hd]
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,  # [layers, 2, S, K, Hd]
        scale: float,
    ) -> torch.Tensor:  # [T, E]: the final normed hidden states
        arch = self._arch
        num_tokens = int(input_ids.shape[0])
        x = F.embedding(input_ids, self._embed)  # a fresh tensor: the residual stream, in place
        h = torch.empty_like(x)
        hd = arch.head_dim
        scratch = torch.empty(num_tokens * self._scratch_per_token, dtype=torch.float32)
        tables, lens = meta.decode_block_tables, meta.decode_lens
        assert tables is not None and lens is not None
        tables, lens = tables.contiguous(), lens.contiguous()
        cos = cos.reshape(num_tokens, hd).contiguous()
        sin = sin.reshape(num_tokens, hd).contiguous()
        slots = meta.slot_mapping.contiguous()
        err = self._kernels.decoder_layers(
            x.data_ptr(), h.data_ptr(), scratch.data_ptr(), self._weights.data_ptr(),
            self._packing.data_ptr(), self._final_norm.data_ptr(), len(self._keep[0]),
            num_tokens, arch.hidden_size, arch.num_heads, arch.num_kv_heads, hd, self._intermediate,
            cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), kv_cache.data_ptr(),
            kv_cache.stride(0), kv_cache.stride(1), tables.data_ptr(), tables.shape[1],
            lens.data_ptr(), meta.block_size, scale, arch.rms_norm_eps, torch.get_num_threads())
        if err == -2:
            raise MemoryError("decode attention could not allocate its scratch memory")
        if err != 0:
            raise RuntimeError(f"the fused decoder layers failed ({err})")
        return h


def build(model: object) -> FusedDecode | None:
    """The plan for ``model`` (a ``DecoderModel``), or None when its layers do not qualify."""
    from moeflow.engine.models.decoder import DecoderModel, DenseMLP  # a cycle otherwise

    assert isinstance(model, DecoderModel)
    kernels = library()
    if kernels is None or os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    arch = model.arch
    if model.embed.dtype != torch.float32 or not model.layers:
        return None
    norms, products, packing = [], [], []
    max_rows = 1 << 30
    intermediate = None
    for layer in model.layers:
        mlp = layer.mlp
        if (not isinstance(mlp, DenseMLP) or layer.qkv_bias is not None
                or layer.q_norm is not None or layer.k_norm is not None):
            return None
        linears = (layer.qkv, layer.o_proj, mlp.gate_up, mlp.down)
        rows = [linear.c_loop_rows(kernels) for linear in linears]
        if min(rows) < 1:
            return None
        max_rows = min(max_rows, *rows)
        if intermediate not in (None, mlp.down.shape[1]):
            return None
        intermediate = mlp.down.shape[1]
        shapes = [((arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim, arch.hidden_size),
                  (arch.hidden_size, arch.num_heads * arch.head_dim),
                  (2 * intermediate, arch.hidden_size), (arch.hidden_size, intermediate)]
        if [linear.shape for linear in linears] != shapes:
            return None
        if not all(t.dtype == torch.float32 and t.is_contiguous()
                   for t in (layer.input_norm, layer.post_norm)):
            return None
        norms.append((layer.input_norm, layer.post_norm))
        products.append(tuple(linear.storage for linear in linears))
        for linear in linears:
            packing += list(linear.c_loop_packing())
    final_norm = model.final_norm
    if final_norm.dtype != torch.float32 or not final_norm.is_contiguous() or intermediate is None:
        return None
    return FusedDecode(kernels, arch, model.embed, norms, final_norm, products, packing,
                       max_rows, intermediate)
