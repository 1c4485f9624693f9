"""Scheduler: decode-first continuous batching, chunked prefill, finishing, abort, preemption.

The end-to-end tests drive the scheduler with a fake model that keeps a fake KV cache (the token
id stored in each slot) and samples ``(sum of the context's token ids) % 50 + 3`` from what it
reads back through the block table, so a wrong block table, a reused block holding other
tokens, or a lost token changes the output.
"""

from __future__ import annotations

import pytest

from moeflow.engine.sequence import Sequence, SequenceStatus
from tests.unit.engine.scheduler_kit import (
    entries,
    make_scheduler,
    make_seq,
    next_token,
    run_step,
)

# -- admission and budgets ------------------------------------------------------------------------


def test_schedule_is_empty_without_requests() -> None:
    sched = make_scheduler()
    assert not sched.has_work
    plan = sched.schedule()
    assert plan.is_empty
    assert plan.num_tokens == 0


def test_waiting_requests_are_admitted_oldest_first_with_all_their_blocks() -> None:
    sched = make_scheduler()
    a, b = make_seq("a", list(range(10))), make_seq("b", list(range(5)))
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert entries(plan) == [("a", 10), ("b", 5)]
    assert sched.running == [a, b]
    assert a.status is SequenceStatus.RUNNING
    assert len(a.block_table) == 3
    assert len(b.block_table) == 2
    assert all(s.completes_sequence for s in plan.scheduled)


def test_max_num_seqs_bounds_the_running_batch() -> None:
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(f"r{i}", [i + 1] * 3) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    plan, _ = run_step(sched)
    assert [rid for rid, _ in entries(plan)] == ["r0", "r1"]
    assert len(sched.running) == 2
    assert list(sched.waiting) == seqs[2:]
    for _ in range(3):
        run_step(sched)
        assert len(sched.running) <= 2


def test_a_long_prompt_is_prefilled_in_chunks_within_the_token_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    seq = make_seq("long", list(range(40)))
    sched.add(seq)
    chunks = []
    while not seq.output_token_ids:
        plan, _ = run_step(sched)
        assert plan.num_tokens <= 16
        (item,) = plan.scheduled
        chunks.append(item.num_new_tokens)
    assert chunks == [16, 16, 8]
    assert seq.num_computed_tokens == 40
    assert seq.output_token_ids == [next_token(list(range(40)))]


def test_pending_prompt_tokens_count_waiting_and_part_prefilled_prompts_not_decodes() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    long, remote = make_seq("long", list(range(40))), make_seq("remote", list(range(30)))
    remote.is_remote_prefill = True  # its KV comes from a prefill instance: not queued here
    sched.add(long)
    sched.add(remote)
    assert sched.num_pending_prompt_tokens == 40
    run_step(sched)
    assert sched.num_pending_prompt_tokens == 24
    while not long.output_token_ids:
        run_step(sched)
    assert sched.num_pending_prompt_tokens == 0  # decoding: one token a step is not a prompt


def test_decodes_go_first_and_prefill_chunks_get_the_rest_of_the_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    short = make_seq("short", [1, 2, 3], max_tokens=10)
    sched.add(short)
    run_step(sched)  # short is now decoding
    long = make_seq("long", list(range(40)))
    sched.add(long)
    plan, _ = run_step(sched)
    assert entries(plan) == [("short", 1), ("long", 15)]
    plan, _ = run_step(sched)
    assert entries(plan) == [("short", 1), ("long", 15)]
    late = make_seq("late", [5] * 6)
    sched.add(late)
    plan, _ = run_step(sched)
    # decode first, then the admitted prompt's remaining 10 tokens, then the newcomer's 5.
    assert entries(plan) == [("short", 1), ("long", 10), ("late", 5)]
    assert plan.num_tokens == 16


def test_decodes_are_scheduled_oldest_first_even_after_a_newer_one() -> None:
    sched = make_scheduler()
    seqs = [make_seq(f"r{i}", [i + 1] * (3 + i), max_tokens=5) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    run_step(sched)
    plan, _ = run_step(sched)
    assert entries(plan) == [("r0", 1), ("r1", 1), ("r2", 1)]


def test_a_token_budget_smaller_than_the_decode_batch_defers_the_newest() -> None:
    sched = make_scheduler(max_num_batched_tokens=2)
    seqs = [make_seq(f"r{i}", [i + 1], max_tokens=5) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    plan, _ = run_step(sched)
    assert entries(plan) == [("r0", 1), ("r1", 1)]
    plan, _ = run_step(sched)
    assert entries(plan) == [("r0", 1), ("r1", 1)]
    assert list(sched.waiting) == [seqs[2]]


# -- postprocess and finishing --------------------------------------------------------------------


def test_postprocess_advances_computed_tokens_and_appends_sampled_tokens() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq("a", list(range(12)), max_tokens=4)
    sched.add(seq)
    plan = sched.schedule()
    assert sched.postprocess(plan, {}) == []  # a partial prefill samples nothing
    assert seq.num_computed_tokens == 8
    assert seq.output_token_ids == []
    plan = sched.schedule()
    assert entries(plan) == [("a", 4)]
    assert sched.postprocess(plan, {"a": 42}) == []
    assert seq.num_computed_tokens == 12
    assert seq.output_token_ids == [42]
    assert seq.num_uncomputed_tokens == 1
    plan = sched.schedule()
    assert entries(plan) == [("a", 1)]
    assert plan.scheduled[0].start_pos == 12
    sched.postprocess(plan, {"a": 43})
    assert seq.output_token_ids == [42, 43]
    assert seq.num_computed_tokens == 13


@pytest.mark.parametrize(
    ("kwargs", "tokens", "reason", "num_outputs"),
    [
        ({"eos": frozenset({9})}, [5, 9, 6], "stop", 2),
        ({"eos": frozenset({9}), "ignore_eos": True, "max_tokens": 3}, [5, 9, 6], "length", 3),
        ({"stop_token_ids": (6,), "ignore_eos": True}, [5, 9, 6], "stop", 3),
        ({"max_tokens": 2}, [5, 9, 6], "length", 2),
    ],
    ids=["eos", "ignore_eos", "stop_token_id", "max_tokens"],
)
def test_sequences_finish_on_eos_stop_ids_or_max_tokens_and_free_their_blocks(
    kwargs: dict, tokens: list[int], reason: str, num_outputs: int
) -> None:
    sched = make_scheduler(num_blocks=8)
    seq = make_seq("a", [1, 2, 3], **kwargs)
    sched.add(seq)
    finished: list[Sequence] = []
    for token in tokens:
        plan = sched.schedule()
        finished = sched.postprocess(plan, {"a": token})
        if finished:
            break
    assert finished == [seq]
    assert seq.finish_reason == reason
    assert seq.status is SequenceStatus.FINISHED
    assert len(seq.output_token_ids) == num_outputs
    assert seq.block_table == []
    assert sched.block_manager.num_free_blocks == 8
    assert not sched.has_work


def test_finish_early_stops_a_running_sequence_with_reason_stop() -> None:
    sched = make_scheduler(num_blocks=8)
    seq = make_seq("a", [1, 2, 3])
    sched.add(seq)
    run_step(sched)
    sched.finish_early(seq)
    assert seq.finish_reason == "stop"
    assert seq.status is SequenceStatus.FINISHED
    assert sched.running == []
    assert sched.block_manager.num_free_blocks == 8


# -- abort ----------------------------------------------------------------------------------------


def test_abort_removes_a_running_request_and_frees_its_blocks() -> None:
    sched = make_scheduler(num_blocks=8)
    a, b = make_seq("a", list(range(9))), make_seq("b", [1, 2])
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert sched.block_manager.num_free_blocks == 4
    assert sched.abort("a") is a
    assert a.finish_reason == "abort"
    assert a.status is SequenceStatus.FINISHED
    assert a.block_table == []
    assert sched.running == [b]
    assert sched.block_manager.num_free_blocks == 7
    plan = sched.schedule()
    assert entries(plan) == [("b", 1)]


def test_abort_removes_a_waiting_request() -> None:
    sched = make_scheduler(num_blocks=8, max_num_seqs=1)
    a, b = make_seq("a", [1, 2]), make_seq("b", [3, 4])
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert list(sched.waiting) == [b]
    assert sched.abort("b") is b
    assert b.finish_reason == "abort"
    assert not sched.waiting
    assert sched.block_manager.num_free_blocks == 7
    assert sched.abort("nope") is None
