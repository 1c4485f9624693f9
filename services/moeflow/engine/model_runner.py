"""Turns a ``StepPlan`` into tensors, runs the model, and samples (the only torch user).

Owns the KV cache tensor [layers, 2, slots, K, Hd] and the model weights. Decoding sequences
are laid out first in the flattened token batch so their attention runs as one batch (the C
kernel reads their contexts through the block tables; the torch path gathers a padded copy).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from moeflow.engine.adapter_store import AdapterStore
from moeflow.engine.lazy_memory import lazy_zeros
from moeflow.engine.lora import AdapterWeights, LoraBatch
from moeflow.engine.models.arch import ArchConfig
from moeflow.engine.models.attention import (
    AttentionMetadata,
    PrefillSpan,
    decode_gather,
    decode_kernel,
)
from moeflow.engine.models.decoder import DecoderModel
from moeflow.engine.models.loader import load_model
from moeflow.engine.sampler import make_generator, sample
from moeflow.engine.scheduler import ScheduledSeq, StepPlan

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def row_order(plan: StepPlan) -> tuple[list[ScheduledSeq], list[ScheduledSeq]]:
    """The step's decodes, then its prefills: the order of their rows in the token batch."""
    decodes = [s for s in plan.scheduled if s.num_new_tokens == 1]
    prefills = [s for s in plan.scheduled if s.num_new_tokens > 1]
    return decodes, prefills


class ModelRunner:
    def __init__(
        self,
        model_dir: Path,
        arch: ArchConfig,
        *,
        dtype: str,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        with_routed_experts: bool = True,
        model: DecoderModel | None = None,
    ) -> None:
        self.arch = arch
        self.block_size = block_size
        self.dtype = DTYPES[dtype]
        started = time.perf_counter()  # cold start: `model` is preloaded (moeflow.coldstart)
        self.model = model if model is not None else load_model(
            model_dir, arch, dtype=self.dtype, max_len=max_model_len,
            with_routed_experts=with_routed_experts)
        self.weight_load_s = time.perf_counter() - started
        num_slots = num_blocks * block_size
        self.kv_cache = lazy_zeros(
            arch.num_layers, 2, num_slots, arch.num_kv_heads, arch.head_dim, dtype=self.dtype
        )
        self._generators: dict[str, torch.Generator | None] = {}
        self.adapters: AdapterStore | None = None
        """The engine's LoRA adapters (set by ``LLMEngine``); sequences name theirs by id."""
        # built (first start on a machine) or mapped (every later one) now, not in a step
        self._decode_kernel = decode_kernel(self.dtype)

    @staticmethod
    def num_blocks_for_bytes(arch: ArchConfig, dtype: str, block_size: int, num_bytes: int) -> int:
        element_bytes = torch.empty((), dtype=DTYPES[dtype]).element_size()
        per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * element_bytes
        return max(1, num_bytes // (per_token * block_size))

    def close(self) -> None:
        """Nothing to release for a runner that holds every weight itself."""

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _slots(self, item: ScheduledSeq, start: int, end: int) -> list[int]:
        table = item.seq.block_table
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _prepare(
        self, plan: StepPlan
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[ScheduledSeq], list[int]]:
        decodes, prefills = row_order(plan)
        ordered = decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampled_items: list[ScheduledSeq] = []
        for item in ordered:
            start = item.start_pos
            end = start + item.num_new_tokens
            input_ids.extend(item.seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(item, start, end))
            if item.completes_sequence:
                sample_rows.append(len(input_ids) - 1)
                sampled_items.append(item)
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long))
        if decodes:
            bs = self.block_size
            lengths = [d.start_pos + 1 for d in decodes]
            blocks = [(n + bs - 1) // bs for n in lengths]
            width = max(blocks)
            meta.num_decode_tokens = len(decodes)
            meta.block_size = bs
            meta.decode_block_tables = torch.tensor(
                [d.seq.block_table[:b] + [0] * (width - b) for d, b in zip(decodes, blocks,
                                                                          strict=True)],
                dtype=torch.int32)
            meta.decode_lens = torch.tensor(lengths, dtype=torch.int32)
            if self._decode_kernel is None:
                meta.decode_gather, meta.decode_mask = decode_gather(
                    meta.decode_block_tables, meta.decode_lens, bs)
        offset = len(decodes)
        for item in prefills:
            n = item.num_new_tokens
            span = PrefillSpan(q_start=offset, q_end=offset + n)
            if item.start_pos > 0:
                ctx = item.start_pos + n
                span.gather = torch.tensor(self._slots(item, 0, ctx), dtype=torch.long)
                q_pos = torch.arange(item.start_pos, ctx)[:, None]
                span.mask = torch.arange(ctx)[None, :] <= q_pos
            meta.prefills.append(span)
            offset += n
        return (
            torch.tensor(input_ids, dtype=torch.long),
            torch.tensor(positions, dtype=torch.long),
            meta,
            sampled_items,
            sample_rows,
        )

    def _prompt_slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        bs = self.block_size
        return torch.tensor([block_table[p // bs] * bs + p % bs for p in range(num_tokens)])

    def kv_slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Cache slots of tokens [0, num_tokens) of a sequence with ``block_table``."""
        return self._prompt_slots(block_table, num_tokens)

    def read_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """A copy of tokens [0, num_tokens)'s K and V: [layers, 2, num_tokens, K, Hd]."""
        return self.kv_cache[:, :, self._prompt_slots(block_table, num_tokens)]

    def write_kv(self, block_table: list[int], kv: torch.Tensor) -> None:
        """Place KV from ``read_kv`` (of an identical model) into this sequence's blocks."""
        a = self.arch
        expected = (a.num_layers, 2, kv.shape[2], a.num_kv_heads, a.head_dim)
        if tuple(kv.shape) != expected or kv.dtype != self.kv_cache.dtype:
            raise ValueError(
                f"received KV of shape {tuple(kv.shape)} {kv.dtype}, expected {expected} "
                f"{self.kv_cache.dtype}: prefill and decode must serve the same model and dtype"
            )
        self.kv_cache[:, :, self._prompt_slots(block_table, kv.shape[2])] = kv

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> dict[str, int]:
        """Run one step; return request_id -> sampled token for sequences that completed."""
        input_ids, positions, meta, sampled_items, sample_rows = self._prepare(plan)
        self.model.lora = self.lora_batch(plan)
        try:
            hidden = self.model.forward(input_ids, positions, meta, self.kv_cache)
        finally:
            self.model.lora = None
        return self._sample(hidden[sample_rows], sampled_items)

    @torch.inference_mode()
    def forward_scratch(self, ids: list[int]) -> torch.Tensor:
        """Final hidden states of ``ids`` from one forward over a scratch KV cache: the
        engine's cache, shared through the prefix cache, is never written. For prompt
        logprobs, which need every position's logits (``model.lora`` applies, if set)."""
        meta, scratch = self.scratch_prefill(len(ids))
        return self.model.forward(torch.tensor(ids), torch.arange(len(ids)), meta, scratch)

    def scratch_prefill(self, num_tokens: int) -> tuple[AttentionMetadata, torch.Tensor]:
        """One prefill of ``num_tokens`` from position 0 and a zeroed KV cache of its own."""
        a = self.arch
        scratch = torch.zeros(a.num_layers, 2, num_tokens, a.num_kv_heads, a.head_dim,
                              dtype=self.kv_cache.dtype)
        meta = AttentionMetadata(slot_mapping=torch.arange(num_tokens))
        meta.prefills.append(PrefillSpan(q_start=0, q_end=num_tokens))
        return meta, scratch

    def lora_batch(self, plan: StepPlan) -> LoraBatch | None:
        """Which rows use which adapter this step; None (nothing to add) without adapters."""
        if self.adapters is None or not any(s.seq.adapter_id for s in plan.scheduled):
            return None
        store = self.adapters
        rows: list[AdapterWeights | None] = []
        for items in row_order(plan):
            for item in items:
                uid = item.seq.adapter_id
                rows.extend([store.weights(uid) if uid else None] * item.num_new_tokens)
        return LoraBatch.for_rows(rows)

    def _sample(self, hidden: torch.Tensor, sampled_items: list[ScheduledSeq]) -> dict[str, int]:
        """Sample one token for each of sampled_items from its final hidden row."""
        if not sampled_items:
            return {}
        logits = self.model.logits(hidden)
        params = [s.seq.sampling for s in sampled_items]
        generators = []
        for s in sampled_items:
            rid = s.seq.request_id
            if rid not in self._generators:
                self._generators[rid] = make_generator(s.seq.sampling)
            generators.append(self._generators[rid])
        token_ids = sample(logits, params, generators)
        return {s.seq.request_id: t for s, t in zip(sampled_items, token_ids, strict=True)}
