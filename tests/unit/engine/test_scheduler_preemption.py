"""Scheduler under memory pressure: preemption, whole runs, and remote-prefill admission."""

from __future__ import annotations

import random

import pytest

from moeflow.domain.messages import SamplingParams
from moeflow.engine.block_manager import BlockManager, num_blocks_for
from moeflow.engine.scheduler import Scheduler
from moeflow.engine.sequence import Sequence, SequenceStatus
from tests.unit.engine.scheduler_kit import (
    BS,
    entries,
    expected_output,
    make_scheduler,
    make_seq,
    random_workload,
    run_step,
    run_to_completion,
    sample_completed,
)

# -- preemption -----------------------------------------------------------------------------------


def preemption_setup() -> tuple[Scheduler, Sequence, Sequence]:
    """Two decoding sequences that both need a new block next step; one block is free."""
    sched = make_scheduler(num_blocks=5, max_num_batched_tokens=64)
    old = make_seq("old", [1] * (2 * BS), max_tokens=20)  # 8 tokens, 2 blocks
    new = make_seq("new", [2] * (2 * BS), max_tokens=20)
    sched.add(old)
    sched.add(new)
    plan, _ = run_step(sched)  # both prefilled; each sampled its 9th token
    assert entries(plan) == [("old", 8), ("new", 8)]
    assert sched.block_manager.num_free_blocks == 1
    assert old.num_uncomputed_tokens == new.num_uncomputed_tokens == 1
    return sched, old, new


def test_running_out_of_blocks_preempts_the_newest_sequence() -> None:
    sched, old, new = preemption_setup()
    # old takes the last free block for its 9th token; new needs one too and there is none.
    plan = sched.schedule()
    assert entries(plan) == [("old", 1)]
    assert plan.preempted == [new]
    assert sched.num_preemptions_total == 1
    assert sched.running == [old]
    assert list(sched.waiting) == [new]
    assert new.status is SequenceStatus.WAITING
    assert new.block_table == []
    assert new.num_computed_tokens == 0
    assert len(new.output_token_ids) == 1  # sampled tokens are kept, only KV is dropped


def test_a_preempted_sequence_goes_back_to_the_front_of_waiting() -> None:
    sched, old, new = preemption_setup()
    queued = make_seq("queued", [3, 3, 3])
    sched.add(queued)
    plan = sched.schedule()
    assert plan.preempted == [new]
    assert list(sched.waiting) == [new, queued]  # head of line blocks the later request


def test_a_preempted_sequence_recomputes_from_zero_and_continues_where_it_stopped() -> None:
    sched, old, new = preemption_setup()
    first_token = new.output_token_ids[0]
    run_step(sched)  # new preempted
    sched.abort("old")  # memory comes back
    plan = sched.schedule()
    assert entries(plan) == [("new", 2 * BS + 1)]  # prompt + the sampled token, from 0
    assert plan.scheduled[0].start_pos == 0
    assert plan.scheduled[0].completes_sequence
    sched.postprocess(plan, sample_completed(plan))
    assert new.output_token_ids[0] == first_token
    assert len(new.output_token_ids) == 2
    assert new.num_computed_tokens == 2 * BS + 1


def test_the_oldest_decode_takes_the_last_block_from_a_newer_one() -> None:
    sched = make_scheduler(num_blocks=3)
    hog = make_seq("hog", [1] * (2 * BS), max_tokens=20)
    small = make_seq("small", [2] * 2, max_tokens=20)
    sched.add(hog)
    sched.add(small)
    run_step(sched)  # hog: 2 blocks and a 9th token to place, small: 1 block, nothing free
    plan = sched.schedule()
    assert plan.preempted == [small]
    assert entries(plan) == [("hog", 1)]  # small's decode was dropped from the plan


def test_a_newest_sequence_that_cannot_grow_preempts_itself_and_resumes_later() -> None:
    sched = make_scheduler(num_blocks=3)
    short = make_seq("short", [1] * 3, max_tokens=2)  # stays within one block
    grower = make_seq("grower", [2] * (2 * BS), max_tokens=4)
    sched.add(short)
    sched.add(grower)
    run_step(sched)
    first = list(grower.output_token_ids)
    plan, finished = run_step(sched)
    assert entries(plan) == [("short", 1)]
    assert plan.preempted == [grower]
    assert finished == [short]
    assert list(sched.waiting) == [grower]
    plan, _ = run_step(sched)  # short's blocks are back: grower recomputes everything
    assert entries(plan) == [("grower", 2 * BS + 1)]
    assert grower.output_token_ids[:1] == first
    while sched.has_work:
        run_step(sched)
    assert grower.output_token_ids == expected_output(grower)
    assert grower.finish_reason == "length"


# -- whole runs with a fake model -----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no_cache", "prefix_cache"])
def test_tiny_memory_preempts_but_every_request_gets_the_same_tokens_as_ample_memory(
    seed: int, prefix_caching: bool
) -> None:
    def workload() -> list[Sequence]:
        return random_workload(seed, shared_prefix=prefix_caching)

    ample = run_to_completion(
        workload(),
        num_blocks=256,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        prefix_caching=prefix_caching,
    )
    tiny = run_to_completion(
        workload(),
        num_blocks=num_blocks_for(2 * BS + 14 + 16, BS) + 1,
        max_num_seqs=6,
        max_num_batched_tokens=16,
        prefix_caching=prefix_caching,
    )
    expected = {s.request_id: expected_output(s) for s in workload()}
    assert ample.outputs == expected
    assert tiny.outputs == expected
    assert tiny.finish_reasons == ample.finish_reasons
    assert ample.num_preemptions == 0
    assert tiny.num_preemptions > 0


@pytest.mark.parametrize("seed", range(3))
def test_batch_composition_never_changes_a_requests_tokens(seed: int) -> None:
    rng = random.Random(100 + seed)
    alone = {}
    for seq in random_workload(seed, shared_prefix=True):
        result = run_to_completion(
            [seq], num_blocks=64, max_num_seqs=1, max_num_batched_tokens=64, prefix_caching=False
        )
        alone.update(result.outputs)
    together = run_to_completion(
        random_workload(seed, shared_prefix=True),
        num_blocks=rng.randint(12, 20),
        max_num_seqs=rng.randint(2, 8),
        max_num_batched_tokens=rng.choice([16, 24, 64]),
        prefix_caching=True,
    )
    assert together.outputs == alone


def test_cached_token_count_never_exceeds_the_prompt_even_after_preemption() -> None:
    """``num_cached_tokens`` becomes ``usage.prompt_tokens_details.cached_tokens``.

    A preempted sequence is readmitted with its sampled tokens in ``token_ids``; the prefix
    index then matches full blocks of *output* tokens, which must not count as cached prompt.
    """
    sched = make_scheduler(num_blocks=6, prefix_caching=True)
    old = make_seq("old", [1] * BS, max_tokens=20)
    new = make_seq("new", [2] * BS, max_tokens=20)
    sched.add(old)
    sched.add(new)
    while not sched.num_preemptions_total:
        run_step(sched)
    assert new.status is SequenceStatus.WAITING
    assert len(new.output_token_ids) > BS  # at least one full block of output was indexed
    sched.abort("old")
    plan = sched.schedule()
    assert entries(plan)[0][0] == "new"
    assert new.num_computed_tokens > new.num_prompt_tokens  # the readmission hit the cache
    assert new.num_cached_tokens <= new.num_prompt_tokens


# -- prefill/decode disaggregation: the decode side's admission --------------------------------


def test_remote_prefill_sequences_reserve_blocks_then_wait_for_kv_without_running() -> None:
    from moeflow.engine.scheduler import Scheduler
    from moeflow.engine.sequence import Sequence, SequenceStatus

    manager = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=True)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=64)
    sampling = SamplingParams(max_tokens=4, temperature=0.0)

    def remote(rid: str, n: int, start: int) -> Sequence:
        # distinct prompts: equal ones would share blocks (tests/unit/engine/test_n_sharing.py)
        return Sequence(rid, list(range(start, start + n)), sampling, frozenset(), 0.0,
                        is_remote_prefill=True)

    first, second = remote("a", 8, 1), remote("b", 8, 20)  # 2 blocks each; 5 blocks in all
    third = remote("c", 8, 40)
    for seq in (first, second, third):
        scheduler.add(seq)
    plan = scheduler.schedule()
    assert [s.request_id for s in plan.kv_pulls] == ["a", "b"]  # c must wait: no memory
    assert plan.scheduled == []  # nothing computes locally
    assert third.status is SequenceStatus.WAITING
    assert scheduler.num_memory_waits_total == 1
    scheduler.kv_arrived(first)
    first.append_token(42)
    assert first.num_computed_tokens == 8 and first.status is SequenceStatus.RUNNING
    assert [s.seq.request_id for s in scheduler.schedule().scheduled] == ["a"]
    scheduler.abort("b")  # frees b's reserved blocks: c gets them
    assert [s.request_id for s in scheduler.schedule().kv_pulls] == ["c"]


def test_abort_of_a_preempted_request_leaves_no_blocks_behind() -> None:
    sched, old, new = preemption_setup()
    plan = sched.schedule()
    assert plan.preempted == [new]
    assert sched.abort("new") is new
    assert new.finish_reason == "abort"
    sched.postprocess(plan, sample_completed(plan))
    sched.abort("old")
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
