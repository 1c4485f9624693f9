"""Paged KV-cache bookkeeping with a prefix index (pure: no torch, no I/O).

The cache is ``num_blocks`` blocks of ``block_size`` token slots. A sequence owns a block table;
slot ``block_table[i // block_size] * block_size + i % block_size`` holds token i's K/V.

Prefix index (DeepServe's RTC, at block granularity): every *full* block is keyed by a hash
chained over all tokens before it, so equal keys mean equal prompt prefixes and equal KV. A
radix tree over token blocks and this chained-hash map answer the same question (longest cached
prefix); the map keeps each lookup O(blocks) without pointer chasing. Blocks whose last owner is
gone stay cached (``evictable``, LRU) until their memory is needed.

A sequence served with a LoRA adapter computes other K/V for the same tokens, so its chain
starts from a root of its adapter (``root_hash``): prefixes are shared only between sequences
of the same adapter, never between an adapter and the base model or another adapter.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from moeflow.engine.sequence import Sequence


@dataclass(frozen=True)
class CachedBlock:
    block_id: int
    tokens: tuple[int, ...]


def chain_hash(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent_hash, tokens))


def root_hash(adapter_id: int) -> int | None:
    """The parent of a chain's first block: None for the base model, else the adapter's."""
    return None if adapter_id == 0 else hash(("lora", adapter_id))


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._ref_counts = [0] * num_blocks
        self._hash_of_block: dict[int, int] = {}
        self._index: dict[int, CachedBlock] = {}
        # request_id -> chained hashes of that sequence's full, indexed blocks
        self._seq_hashes: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._index)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def match_prefix(self, token_ids: Seq[int], adapter_id: int = 0) -> list[int]:
        """Cache blocks holding the longest indexed prefix of ``token_ids`` (full blocks only).

        At least one token is always left uncached so the caller can compute logits for it.
        """
        if not self.enable_prefix_caching:
            return []
        block_ids: list[int] = []
        parent = root_hash(adapter_id)
        max_blocks = (len(token_ids) - 1) // self.block_size
        for i in range(max_blocks):
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            key = chain_hash(parent, tokens)
            cached = self._index.get(key)
            if cached is None or cached.tokens != tokens:
                break
            block_ids.append(cached.block_id)
            parent = key
        return block_ids

    def allocate_prompt(self, seq: Sequence, *, use_prefix_cache: bool = True) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        Returns False (and changes nothing) when there is not enough free memory.
        """
        cached_ids = (self.match_prefix(seq.token_ids, seq.adapter_id) if use_prefix_cache
                      else [])
        num_needed = num_blocks_for(seq.num_tokens, self.block_size) - len(cached_ids)
        num_reclaimable = sum(1 for b in cached_ids if self._ref_counts[b] == 0)
        if num_needed > self.num_free_blocks - num_reclaimable:
            return False
        hashes: list[int] = []
        for block_id in cached_ids:
            self._acquire(block_id)
            hashes.append(self._hash_of_block[block_id])
        seq.block_table = list(cached_ids)
        seq.block_table.extend(self._pop_free() for _ in range(num_needed))
        seq.num_computed_tokens = len(cached_ids) * self.block_size
        if not seq.output_token_ids:  # a readmitted (preempted) sequence keeps its prompt hit
            seq.num_cached_tokens = seq.num_computed_tokens
        self._seq_hashes[seq.request_id] = hashes
        return True

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold ``num_tokens`` tokens; False if memory ran out."""
        num_needed = num_blocks_for(num_tokens, self.block_size) - len(seq.block_table)
        if num_needed > self.num_free_blocks:
            return False
        seq.block_table.extend(self._pop_free() for _ in range(num_needed))
        return True

    def index_computed_blocks(self, seq: Sequence) -> None:
        """Enter the sequence's newly completed full blocks into the prefix index."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.request_id, [])
        num_full = seq.num_computed_tokens // self.block_size
        token_ids = seq.token_ids
        while len(hashes) < num_full:
            i = len(hashes)
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            key = chain_hash(hashes[-1] if hashes else root_hash(seq.adapter_id), tokens)
            hashes.append(key)
            block_id = seq.block_table[i]
            if key not in self._index and block_id not in self._hash_of_block:
                self._index[key] = CachedBlock(block_id, tokens)
                self._hash_of_block[block_id] = key

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks; indexed blocks stay cached until evicted."""
        for block_id in reversed(seq.block_table):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if block_id in self._hash_of_block:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table = []
        self._seq_hashes.pop(seq.request_id, None)

    def _acquire(self, block_id: int) -> None:
        if self._ref_counts[block_id] == 0:
            self._evictable.pop(block_id, None)
        self._ref_counts[block_id] += 1

    def _pop_free(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            key = self._hash_of_block.pop(block_id)
            del self._index[key]
        self._ref_counts[block_id] = 1
        return block_id
