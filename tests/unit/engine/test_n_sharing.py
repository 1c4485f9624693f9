"""``n`` > 1: the choices of one prompt share its KV blocks instead of each computing it.

The first choice admitted computes the prompt; its siblings wait for its full blocks and take
them from the prefix cache, computing only what lies past them (the last, partial block). The
fake model of ``scheduler_kit`` reads every context back through the block tables, so a shared
block holding the wrong tokens would change the outputs.
"""

from __future__ import annotations

from moeflow.domain.messages import SamplingParams
from moeflow.engine.block_manager import BlockManager
from moeflow.engine.scheduler import Scheduler
from moeflow.engine.sequence import Sequence, SequenceStatus
from tests.unit.engine.scheduler_kit import (
    BS,
    FakeModel,
    expected_output,
    make_scheduler,
    make_seq,
    run_to_completion,
)

PROMPT = [5, 9, 2, 7, 1, 8, 3, 6, 4, 11]  # 10 tokens: 2 full blocks of 4 and a partial one
N = 4


def _prefill_cost(prefix_caching: bool) -> tuple[int, int, list[list[int]]]:
    """(prompt tokens computed, blocks held once every choice has its first token, outputs)."""
    sched = make_scheduler(64, max_num_batched_tokens=64, prefix_caching=prefix_caching)
    model = FakeModel(64, BS)
    seqs = [make_seq(f"c-{i}", PROMPT, max_tokens=3) for i in range(N)]
    for seq in seqs:
        sched.add(seq)
    computed = 0
    blocks_at_first_tokens = 0
    while sched.has_work:
        plan = sched.schedule()
        computed += sum(s.num_new_tokens for s in plan.scheduled if not s.seq.output_token_ids)
        sched.postprocess(plan, model.execute(plan))
        if blocks_at_first_tokens == 0 and all(s.output_token_ids for s in seqs):
            used = sched.block_manager.num_blocks - sched.block_manager.num_free_blocks
            blocks_at_first_tokens = used
    return computed, blocks_at_first_tokens, [s.output_token_ids for s in seqs]


def test_n_choices_compute_the_prompt_about_once_and_share_its_blocks() -> None:
    computed, blocks, outputs = _prefill_cost(prefix_caching=True)
    alone, alone_blocks, alone_outputs = _prefill_cost(prefix_caching=False)
    assert alone == N * len(PROMPT)  # without sharing: every choice computes the whole prompt
    assert alone_blocks == N * 3
    # the first choice computes 10 tokens; each sibling only its last, partial block (2)
    assert computed == len(PROMPT) + (N - 1) * (len(PROMPT) % BS)
    assert computed < 2 * len(PROMPT)
    # 3 blocks for the first choice, 1 of its own for each sibling (2 shared full blocks)
    assert blocks == 3 + (N - 1)
    assert outputs == alone_outputs == [expected_output(make_seq("x", PROMPT, max_tokens=3))] * N


def test_siblings_wait_for_the_first_prefill_then_hit_the_cache() -> None:
    sched = make_scheduler(64, max_num_batched_tokens=64, prefix_caching=True)
    seqs = [make_seq(f"c-{i}", PROMPT) for i in range(N)]
    for seq in seqs:
        sched.add(seq)
    first = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in first.scheduled] == [("c-0", 10)]
    assert all(s.status is SequenceStatus.WAITING for s in seqs[1:])
    sched.postprocess(first, {"c-0": 42})
    second = sched.schedule()
    # c-0 decodes; each sibling computes 2 tokens on top of 8 cached ones
    assert [(s.seq.request_id, s.start_pos, s.num_new_tokens) for s in second.scheduled] == [
        ("c-0", 10, 1), ("c-1", 8, 2), ("c-2", 8, 2), ("c-3", 8, 2)]
    shared = seqs[0].block_table[:2]
    assert all(s.block_table[:2] == shared for s in seqs[1:])
    assert all(s.num_cached_tokens == 8 for s in seqs[1:])


def test_a_shared_system_prompt_waits_only_for_its_own_blocks_in_a_chunked_prefill() -> None:
    system = list(range(20, 28))  # 2 blocks
    long = make_seq("long", system + list(range(40, 60)))  # 28 tokens: 7 chunks of 4
    short = make_seq("short", system + [1, 2, 3])
    sched = make_scheduler(64, max_num_batched_tokens=4, prefix_caching=True)
    sched.clock = lambda: 0.0  # nothing ages: the shorter remaining prefill goes first
    sched.add(long)
    plan = sched.schedule()
    sched.postprocess(plan, {})
    sched.add(short)
    # long has computed block 0 only: short would gain block 1 by waiting one more step
    plan = sched.schedule()
    assert [s.seq.request_id for s in plan.scheduled] == ["long"]
    sched.postprocess(plan, {})
    plan = sched.schedule()  # both system blocks are indexed now: short comes in with them
    assert short.status is SequenceStatus.RUNNING and short.num_cached_tokens == 8
    assert ("short", 8) in [(s.seq.request_id, s.start_pos) for s in plan.scheduled]


def test_unrelated_prompts_and_no_prefix_cache_never_wait() -> None:
    for caching, prompts in ((True, [PROMPT, [p + 1 for p in PROMPT]]), (False, [PROMPT] * 2)):
        sched = make_scheduler(64, max_num_batched_tokens=64, prefix_caching=caching)
        for i, prompt in enumerate(prompts):
            sched.add(make_seq(f"r{i}", prompt))
        assert len(sched.schedule().scheduled) == 2


def test_the_same_prompt_with_another_lora_adapter_does_not_wait() -> None:
    sched = make_scheduler(64, max_num_batched_tokens=64, prefix_caching=True)
    base, tuned = make_seq("base", PROMPT), make_seq("tuned", PROMPT)
    tuned.adapter_id = 1  # other K/V for the same tokens: nothing to share
    sched.add(base)
    sched.add(tuned)
    assert [s.seq.request_id for s in sched.schedule().scheduled] == ["base", "tuned"]


def test_a_sibling_whose_leader_is_aborted_computes_the_prompt_itself() -> None:
    sched = make_scheduler(64, max_num_batched_tokens=64, prefix_caching=True)
    a, b = make_seq("a", PROMPT), make_seq("b", PROMPT)
    sched.add(a)
    sched.add(b)
    assert [s.seq.request_id for s in sched.schedule().scheduled] == ["a"]
    sched.abort("a")  # its step never ran: nothing of it is cached
    plan = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("b", 10)]


def test_n_choices_under_memory_pressure_and_chunking_still_give_exact_outputs() -> None:
    seqs = [make_seq(f"c-{i}", PROMPT + [i % 2], max_tokens=12) for i in range(6)]
    result = run_to_completion(seqs, num_blocks=12, max_num_seqs=6, max_num_batched_tokens=6,
                               prefix_caching=True)
    for seq in seqs:
        assert result.outputs[seq.request_id] == expected_output(seq)


def test_decode_side_siblings_fetch_only_past_the_shared_blocks() -> None:
    """PD: the choices' KV comes from a prefill instance. The first one's arrives and is
    indexed; its siblings then reserve only their own last block (LLMEngine.attach_kv writes
    the KV past the shared blocks)."""
    manager = BlockManager(num_blocks=32, block_size=BS, enable_prefix_caching=True)
    sched = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=64)
    sampling = SamplingParams(max_tokens=4, temperature=0.0)
    seqs = [Sequence(f"c-{i}", list(PROMPT), sampling, frozenset(), 0.0,
                     is_remote_prefill=True) for i in range(N)]
    for seq in seqs:
        sched.add(seq)
    assert [s.request_id for s in sched.schedule().kv_pulls] == ["c-0"]
    sched.kv_arrived(seqs[0])
    seqs[0].append_token(42)
    plan = sched.schedule()
    assert [s.request_id for s in plan.kv_pulls] == ["c-1", "c-2", "c-3"]
    for seq in seqs[1:]:
        assert seq.block_table[:2] == seqs[0].block_table[:2]
        assert seq.num_computed_tokens == 8  # attach_kv writes tokens 8.. only
    assert manager.num_blocks - manager.num_free_blocks == 3 + (N - 1)
