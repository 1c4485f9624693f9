"""A step that raises with several sequences: each of them then runs alone until a step of its
own succeeds, so a request that makes steps fail is found and fails by itself (pure scheduler)."""

from __future__ import annotations

import random

import pytest

from moeflow.engine.scheduler import Scheduler, StepPlan
from moeflow.engine.sequence import Sequence
from tests.unit.engine.scheduler_kit import (
    BS,
    entries,
    expected_output,
    make_scheduler,
    make_seq,
    run_step,
    sample_completed,
)


def failing_run(sched: Scheduler, seqs: list[Sequence], poison: str | None,
                fail_at_step: int, max_steps: int = 2000) -> tuple[list[str], list[StepPlan]]:
    """Drive ``sched`` like LLMEngine.step does: a step holding ``poison`` raises (always; or
    only once at ``fail_at_step`` when poison is None); returns the failed request ids."""
    for seq in seqs:
        sched.add(seq)
    failed: list[str] = []
    plans: list[StepPlan] = []
    for step in range(max_steps):
        if not sched.has_work:
            break
        plan = sched.schedule()
        plans.append(plan)
        ids = {s.seq.request_id for s in plan.scheduled}
        breaks = (poison in ids) if poison else step == fail_at_step and len(ids) > 1
        if breaks:
            if len(ids) > 1:
                sched.quarantine([s.seq for s in plan.scheduled])
            else:
                failed.append(ids.pop())
                sched.abort(failed[-1])
            continue
        sched.postprocess(plan, sample_completed(plan))
    return failed, plans


@pytest.mark.parametrize("seed", range(8))
def test_a_transient_fault_loses_no_sequence(seed: int) -> None:
    rng = random.Random(seed)
    seqs = [make_seq(f"s{i}", [rng.randrange(100) for _ in range(rng.randint(1, 3 * BS))],
                     max_tokens=rng.randint(2, 9), ignore_eos=True) for i in range(6)]
    sched = make_scheduler(64, max_num_batched_tokens=32)
    failed, plans = failing_run(sched, seqs, None, fail_at_step=rng.randint(0, 4))
    assert failed == []
    for seq in seqs:
        assert seq.output_token_ids == expected_output(seq), seq.request_id
    assert sched.num_quarantines_total == 1
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


@pytest.mark.parametrize("seed", range(8))
def test_a_poison_sequence_fails_alone(seed: int) -> None:
    rng = random.Random(seed)
    seqs = [make_seq(f"s{i}", [rng.randrange(100) for _ in range(rng.randint(1, 3 * BS))],
                     max_tokens=rng.randint(2, 9), ignore_eos=True) for i in range(6)]
    poison = f"s{rng.randrange(6)}"
    sched = make_scheduler(64, max_num_batched_tokens=32)
    failed, plans = failing_run(sched, seqs, poison, fail_at_step=-1)
    assert failed == [poison]
    for seq in seqs:
        if seq.request_id != poison:
            assert seq.output_token_ids == expected_output(seq), seq.request_id
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_suspects_run_one_at_a_time_then_the_batch_resumes() -> None:
    sched = make_scheduler(64, max_num_batched_tokens=64)
    a, b, c = (make_seq(n, [n_ord] * 5, max_tokens=4, ignore_eos=True)
               for n, n_ord in (("a", 1), ("b", 2), ("c", 3)))
    for seq in (a, b):
        sched.add(seq)
    plan = sched.schedule()
    assert entries(plan) == [("a", 5), ("b", 5)]
    sched.quarantine([a, b])
    sched.add(c)  # arrives meanwhile: waits while suspects are isolated
    assert entries(run_step(sched)[0]) == [("a", 5)]  # alone; its token clears it
    assert entries(run_step(sched)[0]) == [("b", 5)]
    assert not a.is_suspect and not b.is_suspect
    assert sorted(entries(run_step(sched)[0])) == [("a", 1), ("b", 1), ("c", 5)]
