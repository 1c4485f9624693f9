"""BlockManager: paged KV bookkeeping, chained-hash prefix index, ref counts, LRU eviction."""

from __future__ import annotations

import random

import pytest

from moeflow.domain.messages import SamplingParams
from moeflow.engine.block_manager import BlockManager, chain_hash, num_blocks_for
from moeflow.engine.sequence import Sequence

BS = 4  # block size used throughout


def make_seq(request_id: str, prompt: list[int], max_tokens: int = 16) -> Sequence:
    return Sequence(
        request_id=request_id,
        prompt_token_ids=list(prompt),
        sampling=SamplingParams(max_tokens=max_tokens),
        eos_token_ids=frozenset(),
        arrival_s=0.0,
    )


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the scheduler does once a step has computed every token of ``seq``."""
    seq.num_computed_tokens = seq.num_tokens
    bm.index_computed_blocks(seq)


def live_blocks(*seqs: Sequence) -> set[int]:
    return {b for s in seqs for b in s.block_table}


# -- helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "expected"), [(0, 0), (1, 1), (BS - 1, 1), (BS, 1), (BS + 1, 2), (3 * BS, 3)]
)
def test_num_blocks_for_rounds_up_to_whole_blocks(num_tokens: int, expected: int) -> None:
    assert num_blocks_for(num_tokens, BS) == expected


def test_chain_hash_depends_on_the_parent_and_the_tokens() -> None:
    root = chain_hash(None, (1, 2, 3, 4))
    assert root == chain_hash(None, (1, 2, 3, 4))
    assert root != chain_hash(None, (1, 2, 3, 5))
    assert chain_hash(root, (5, 6, 7, 8)) != chain_hash(None, (5, 6, 7, 8))


def test_a_cache_without_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(0, BS, enable_prefix_caching=True)


# -- allocation -----------------------------------------------------------------------------------


def test_allocate_prompt_takes_one_block_per_started_block_of_tokens() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    seq = make_seq("a", list(range(10)))  # 10 tokens -> 3 blocks
    assert bm.allocate_prompt(seq)
    assert len(seq.block_table) == 3
    assert len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert seq.num_computed_tokens == 0
    assert seq.num_cached_tokens == 0


def test_ensure_slots_grows_the_table_only_when_a_new_block_starts() -> None:
    bm = BlockManager(4, BS, enable_prefix_caching=False)
    seq = make_seq("a", list(range(BS)))
    assert bm.allocate_prompt(seq)
    assert len(seq.block_table) == 1
    assert bm.ensure_slots(seq, BS)  # still fits
    assert len(seq.block_table) == 1
    assert bm.ensure_slots(seq, BS + 1)
    assert len(seq.block_table) == 2
    assert bm.num_free_blocks == 2


def test_ensure_slots_fails_without_side_effects_when_memory_is_short() -> None:
    bm = BlockManager(2, BS, enable_prefix_caching=False)
    seq = make_seq("a", list(range(BS)))
    assert bm.allocate_prompt(seq)
    table = list(seq.block_table)
    assert not bm.ensure_slots(seq, 3 * BS)  # needs two more blocks, one is free
    assert seq.block_table == table
    assert bm.num_free_blocks == 1


def test_allocate_prompt_fails_without_side_effects_when_memory_is_short() -> None:
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    # Leave a cached (evictable) 2-block prefix plus two free blocks.
    first = make_seq("first", list(range(2 * BS + 1)))
    assert bm.allocate_prompt(first)
    compute_all(bm, first)
    bm.free(first)
    assert bm.num_free_blocks == 4
    assert bm.num_cached_blocks == 2
    # Same prefix, but 2 + 3 more blocks: the hit covers 2, 3 are needed and only 2 are spare.
    big = make_seq("big", list(range(2 * BS)) + [99] * (2 * BS + 1))
    assert not bm.allocate_prompt(big)
    assert big.block_table == []
    assert big.num_computed_tokens == 0
    assert big.num_cached_tokens == 0
    assert bm.num_free_blocks == 4
    assert bm.num_cached_blocks == 2
    # The cached prefix was not pinned by the failed attempt: it is still a reusable hit...
    assert len(bm.match_prefix(big.token_ids)) == 2
    # ...and all four blocks can still be handed out.
    other = make_seq("other", [7] * (4 * BS))
    assert bm.allocate_prompt(other)
    assert bm.num_free_blocks == 0


def test_allocation_counts_reused_evictable_blocks_only_once() -> None:
    bm = BlockManager(3, BS, enable_prefix_caching=True)
    first = make_seq("first", list(range(2 * BS + 1)))
    assert bm.allocate_prompt(first)
    compute_all(bm, first)
    bm.free(first)  # 2 evictable (indexed) + 1 free
    # 2 cached blocks + 1 new block: exactly fits, because the hit blocks are not "free" twice.
    fits = make_seq("fits", list(range(2 * BS)) + [50, 51, 52])
    hit = bm.match_prefix(fits.token_ids)
    assert len(hit) == 2
    assert bm.allocate_prompt(fits)
    assert fits.block_table[:2] == hit
    assert bm.num_free_blocks == 0
    bm.free(fits)
    # 2 cached + 2 new would need 4 blocks in a 3-block cache.
    too_big = make_seq("too_big", list(range(2 * BS)) + [50] * (BS + 1))
    assert not bm.allocate_prompt(too_big)
    assert bm.num_free_blocks == 3


def test_freeing_returns_every_block() -> None:
    bm = BlockManager(6, BS, enable_prefix_caching=False)
    a = make_seq("a", list(range(9)))
    b = make_seq("b", list(range(5)))
    assert bm.allocate_prompt(a)
    assert bm.allocate_prompt(b)
    assert bm.num_free_blocks == 1
    assert live_blocks(a).isdisjoint(live_blocks(b))
    bm.free(a)
    assert a.block_table == []
    assert bm.num_free_blocks == 4
    bm.free(b)
    assert bm.num_free_blocks == 6


# -- prefix matching ------------------------------------------------------------------------------


def test_prefix_hit_reuses_blocks_and_leaves_one_token_uncached() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    prompt = list(range(2 * BS))  # exactly two full blocks
    a = make_seq("a", prompt)
    assert bm.allocate_prompt(a)
    compute_all(bm, a)
    assert bm.num_cached_blocks == 2
    # Identical prompt: only the first block may be reused, so the last token is computed again.
    b = make_seq("b", prompt)
    assert bm.allocate_prompt(b)
    assert b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1]
    assert b.num_computed_tokens == BS
    assert b.num_cached_tokens == BS
    assert b.num_uncomputed_tokens == BS
    # One more token: both full blocks are now a legal hit.
    c = make_seq("c", [*prompt, 1000])
    assert bm.allocate_prompt(c)
    assert c.block_table[:2] == a.block_table
    assert c.num_computed_tokens == 2 * BS
    assert c.num_uncomputed_tokens == 1


def test_match_prefix_stops_at_the_first_differing_block() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = make_seq("a", list(range(3 * BS + 1)))
    assert bm.allocate_prompt(a)
    compute_all(bm, a)
    tokens = list(range(3 * BS + 1))
    tokens[BS + 1] = 999  # second block differs, third block equal again
    assert bm.match_prefix(tokens) == a.block_table[:1]
    assert bm.match_prefix([999, *tokens[1:]]) == []


def test_a_block_is_matched_only_under_the_same_prefix() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = make_seq("a", [1, 1, 1, 1, 5, 6, 7, 8, 0])
    assert bm.allocate_prompt(a)
    compute_all(bm, a)
    # Block 2's tokens are cached, but after a different first block: no hit at all.
    assert bm.match_prefix([2, 2, 2, 2, 5, 6, 7, 8, 0]) == []


def test_match_prefix_never_covers_the_last_token_and_only_full_blocks() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = make_seq("a", list(range(5 * BS)))
    assert bm.allocate_prompt(a)
    compute_all(bm, a)
    for length in range(1, 5 * BS + 1):
        hit = bm.match_prefix(list(range(length)))
        assert len(hit) == (length - 1) // BS
        assert len(hit) * BS < length


def test_prefix_caching_disabled_never_indexes_or_matches() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq("a", list(range(3 * BS)))
    assert bm.allocate_prompt(a)
    compute_all(bm, a)
    assert bm.num_cached_blocks == 0
    b = make_seq("b", list(range(3 * BS)))
    assert bm.allocate_prompt(b)
    assert b.num_computed_tokens == 0
    assert live_blocks(a).isdisjoint(live_blocks(b))
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_index_computed_blocks_registers_only_full_computed_blocks() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = make_seq("a", list(range(3 * BS - 1)))  # 2 full blocks + a partial one
    assert bm.allocate_prompt(a)
    a.num_computed_tokens = BS + 2  # chunked prefill: one full block computed so far
    bm.index_computed_blocks(a)
    assert bm.num_cached_blocks == 1
    assert bm.match_prefix(list(range(3 * BS))) == a.block_table[:1]
    a.num_computed_tokens = a.num_tokens  # prompt done; the last block is still partial
    bm.index_computed_blocks(a)
    assert bm.num_cached_blocks == 2
    # Decode fills the partial block; it is indexed once computed, with the sampled token in it.
    a.output_token_ids.append(500)
    bm.index_computed_blocks(a)  # the new token is not computed yet
    assert bm.num_cached_blocks == 2
    a.num_computed_tokens = a.num_tokens
    bm.index_computed_blocks(a)
    assert bm.num_cached_blocks == 3
    assert bm.match_prefix([*range(3 * BS - 1), 500, 0]) == a.block_table


def test_equal_blocks_computed_concurrently_are_indexed_once() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = make_seq("a", list(range(BS + 1)))
    b = make_seq("b", list(range(BS + 1)))
    assert bm.allocate_prompt(a)
    assert bm.allocate_prompt(b)  # allocated before a was computed: no hit, own blocks
    assert live_blocks(a).isdisjoint(live_blocks(b))
    compute_all(bm, a)
    compute_all(bm, b)
    assert bm.num_cached_blocks == 1
    assert bm.match_prefix(list(range(BS + 1))) == a.block_table[:1]
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8


# -- ref counts, eviction -------------------------------------------------------------------------


def test_shared_blocks_stay_in_use_until_their_last_owner_is_freed() -> None:
    bm = BlockManager(6, BS, enable_prefix_caching=True)
    prompt = list(range(2 * BS + 1))
    a = make_seq("a", prompt)
    assert bm.allocate_prompt(a)
    compute_all(bm, a)
    b = make_seq("b", prompt)
    assert bm.allocate_prompt(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.num_free_blocks == 6 - 4  # 2 shared + a's tail + b's tail
    bm.free(a)
    assert bm.num_free_blocks == 3  # only a's private tail came back
    assert len(bm.match_prefix(prompt)) == 2
    # The shared blocks are still b's: filling memory must not evict them.
    filler = make_seq("filler", [77] * (3 * BS))
    assert bm.allocate_prompt(filler)
    assert live_blocks(filler).isdisjoint(live_blocks(b))
    assert bm.match_prefix(prompt) == b.block_table[:2]
    bm.free(b)
    bm.free(filler)
    assert bm.num_free_blocks == 6


def test_freed_indexed_blocks_stay_cached_until_memory_is_needed() -> None:
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    prompt = list(range(2 * BS + 1))
    a = make_seq("a", prompt)
    assert bm.allocate_prompt(a)
    compute_all(bm, a)
    root = a.block_table[0]
    bm.free(a)
    assert bm.num_free_blocks == 4  # evictable blocks count as free
    assert bm.num_cached_blocks == 2
    # A new sequence that fits in the never-indexed blocks leaves the cache alone.
    small = make_seq("small", [9] * BS)
    assert bm.allocate_prompt(small)
    assert bm.num_cached_blocks == 2
    assert len(bm.match_prefix(prompt)) == 2
    # Needing one block more than the plain free ones evicts exactly one cached block: the
    # deepest one (freed first), so the root of the prefix survives.
    big = make_seq("big", [8] * (2 * BS))
    assert bm.allocate_prompt(big)
    assert bm.num_free_blocks == 1  # the surviving cached block is still reclaimable
    assert bm.num_cached_blocks == 1
    assert bm.match_prefix(prompt) == [root]


def test_eviction_takes_the_least_recently_freed_block_first() -> None:
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    old = make_seq("old", [1] * BS + [0])
    new = make_seq("new", [2] * BS + [0])
    for seq in (old, new):
        assert bm.allocate_prompt(seq)
        compute_all(bm, seq)
    bm.free(old)
    bm.free(new)
    assert bm.num_cached_blocks == 2
    # Two unindexed tails are free; a third block must come from the cache: the older one.
    filler = make_seq("filler", [3] * (3 * BS))
    assert bm.allocate_prompt(filler)
    assert bm.match_prefix(old.prompt_token_ids) == []
    assert len(bm.match_prefix(new.prompt_token_ids)) == 1


def test_a_reused_cached_block_is_pinned_and_never_evicted_from_under_its_user() -> None:
    bm = BlockManager(2, BS, enable_prefix_caching=True)
    a = make_seq("a", [1] * BS + [0])
    assert bm.allocate_prompt(a)
    compute_all(bm, a)
    bm.free(a)
    b = make_seq("b", [1] * BS + [5])
    assert bm.allocate_prompt(b)  # reuses the cached block, takes the free one
    assert bm.num_free_blocks == 0
    c = make_seq("c", [4])
    assert not bm.allocate_prompt(c)  # the pinned hit must not be evicted from under b
    bm.free(b)
    assert bm.allocate_prompt(c)


# -- property: random allocate / compute / free cycles ---------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_random_allocate_and_free_cycles_never_leak_or_corrupt_blocks(seed: int) -> None:
    rng = random.Random(seed)
    num_blocks = rng.randint(4, 24)
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=rng.random() < 0.8)
    content: dict[int, tuple[int, ...]] = {}  # block id -> tokens whose KV it holds (computed)
    live: list[Sequence] = []
    prefixes = [[rng.randrange(6) for _ in range(3 * BS)] for _ in range(3)]
    for step in range(400):
        op = rng.random()
        if op < 0.45:
            prefix = rng.choice(prefixes)[: rng.randint(0, 3 * BS)]
            tail = [rng.randrange(6) for _ in range(rng.randint(1, 2 * BS))]
            seq = make_seq(f"r{step}", prefix + tail)
            free_before = bm.num_free_blocks
            cached_before = bm.num_cached_blocks
            hit = bm.match_prefix(seq.token_ids)
            if bm.allocate_prompt(seq):
                assert seq.block_table[: len(hit)] == hit
                assert seq.num_computed_tokens == len(hit) * BS < seq.num_tokens
                for i, block_id in enumerate(hit):  # a hit must hold exactly these tokens
                    assert content[block_id] == tuple(seq.token_ids[i * BS : (i + 1) * BS])
                live.append(seq)
            else:
                assert seq.block_table == []
                assert bm.num_free_blocks == free_before
                assert bm.num_cached_blocks == cached_before
        elif op < 0.75 and live:
            seq = rng.choice(live)
            # compute some tokens (maybe all), maybe sample one more and make room for it
            target = rng.randint(seq.num_computed_tokens, seq.num_tokens)
            for pos in range(seq.num_computed_tokens, target):
                block_id = seq.block_table[pos // BS]
                written = content.get(block_id, ()) if pos % BS else ()
                content[block_id] = (*written, seq.token_ids[pos])
            seq.num_computed_tokens = target
            bm.index_computed_blocks(seq)
            if target == seq.num_tokens and bm.ensure_slots(seq, seq.num_tokens + 1):
                seq.output_token_ids.append(rng.randrange(6))
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        # invariants after every operation
        held = live_blocks(*live)
        assert bm.num_free_blocks + len(held) == num_blocks
        owners: dict[int, int] = {}
        for s in live:
            assert len(s.block_table) == num_blocks_for(s.num_tokens, BS)
            for b in s.block_table:
                owners[b] = owners.get(b, 0) + 1
        for block_id, count in owners.items():
            if count > 1:  # only indexed, full, computed prefix blocks are ever shared
                assert len(content[block_id]) == BS
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == num_blocks
