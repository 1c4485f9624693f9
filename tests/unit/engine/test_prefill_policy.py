"""Prefill order: shortest remaining prefill first, aging so a long prompt is never starved.

The pure ordering first, then the scheduler driven by a clock the test owns (one second per
step) and the fake model of ``scheduler_kit``, which reads every context back through the
block tables, so an order that lost or misplaced a token would change the outputs.
"""

from __future__ import annotations

import random

import pytest

from moeflow.engine.prefill_policy import PrefillCandidate, prefill_order
from moeflow.engine.scheduler import Scheduler
from moeflow.engine.sequence import Sequence
from tests.unit.engine.scheduler_kit import (
    BS,
    FakeModel,
    expected_output,
    make_scheduler,
    make_seq,
)


def _order(items: list[tuple[int, float]], now: float, max_wait: float) -> list[int]:
    return prefill_order([PrefillCandidate(r, a) for r, a in items], now_s=now,
                         max_wait_s=max_wait)


def test_shortest_remaining_prefill_goes_first_ties_by_arrival() -> None:
    assert _order([(500, 0.0), (7, 1.0), (30, 2.0), (7, 0.5)], now=3.0, max_wait=10.0) == [
        3, 1, 2, 0]


def test_aged_prompts_go_before_all_others_oldest_first() -> None:
    # waited 10 s and 9 s (>= 5): first, by arrival; the fresh ones after, shortest first
    assert _order([(9000, 1.0), (3, 9.0), (400, 0.0), (2, 14.0)], now=10.0, max_wait=5.0) == [
        2, 0, 3, 1]


def test_zero_max_wait_is_arrival_order() -> None:
    items = [(50, 3.0), (1, 2.0), (900, 0.0), (4, 1.0)]
    assert _order(items, now=3.0, max_wait=0.0) == [2, 3, 1, 0]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _scheduler(budget: int, max_wait_s: float, clock: _Clock) -> Scheduler:
    sched = make_scheduler(256, max_num_seqs=64, max_num_batched_tokens=budget)
    sched.prefill_max_wait_s = max_wait_s
    sched.clock = clock
    return sched


def _arrive(sched: Scheduler, clock: _Clock, rid: str, length: int, seed: int = 0,
            max_tokens: int = 2) -> Sequence:
    rng = random.Random(f"{rid}/{seed}")
    seq = make_seq(rid, [rng.randrange(1, 100) for _ in range(length)], max_tokens=max_tokens)
    seq.arrival_s = clock.now
    sched.add(seq)
    return seq


def test_short_prompts_are_not_stuck_behind_a_long_chunked_prefill() -> None:
    clock = _Clock()
    sched = _scheduler(budget=16, max_wait_s=100.0, clock=clock)
    model = FakeModel(256, BS)
    long = _arrive(sched, clock, "long", 160)  # 10 steps of chunks on its own
    plan = sched.schedule()
    sched.postprocess(plan, model.execute(plan))
    clock.now = 1.0
    shorts = [_arrive(sched, clock, f"s{i}", 5) for i in range(3)]
    plan = sched.schedule()
    # the three short prompts (15 tokens) come first; the long one gets what is left
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [
        ("s0", 5), ("s1", 5), ("s2", 5), ("long", 1)]
    assert plan.num_tokens <= 16
    sched.postprocess(plan, model.execute(plan))
    assert all(len(s.output_token_ids) == 1 for s in shorts)  # first tokens after 2 steps
    assert long.num_computed_tokens == 17


def test_a_long_prompt_is_never_starved_by_a_stream_of_short_ones() -> None:
    """Short prompts arrive faster than the budget serves them; the long one waits until it
    has aged (``max_wait_s``), then has priority until its prefill is done."""
    clock = _Clock()
    max_wait = 5.0
    sched = _scheduler(budget=16, max_wait_s=max_wait, clock=clock)
    model = FakeModel(256, BS)
    long = _arrive(sched, clock, "long", 64, max_tokens=1)
    step = 0
    while not long.is_finished:
        step += 1
        assert step < 40, "the long prompt starved"
        for j in range(4):  # 4 x 5 tokens per step > the 16-token budget
            _arrive(sched, clock, f"s{step}-{j}", 5, max_tokens=1)
        plan = sched.schedule()
        assert plan.num_tokens <= 16
        if clock.now - long.arrival_s < max_wait:
            assert long not in [s.seq for s in plan.scheduled]  # fresh short ones go first
        else:
            assert plan.scheduled[0].seq is long  # aged: it goes first, a full chunk
            assert plan.scheduled[0].num_new_tokens == min(16, long.num_uncomputed_tokens)
        sched.postprocess(plan, model.execute(plan))
        clock.now += 1.0
    # it waited max_wait seconds (one step each), then 64 / 16 = 4 steps of chunks
    assert step == int(max_wait) + 1 + 64 // 16 - 1


@pytest.mark.parametrize("seed", range(8))
def test_any_arrival_pattern_gives_every_request_its_exact_tokens(seed: int) -> None:
    rng = random.Random(seed)
    clock = _Clock()
    budget = rng.choice([16, 24, 40])
    sched = _scheduler(budget=budget, max_wait_s=rng.choice([0.0, 3.0, 1000.0]), clock=clock)
    sched.block_manager.enable_prefix_caching = rng.random() < 0.5
    model = FakeModel(256, BS)
    pending = [(rng.randrange(0, 20), f"r{i}", rng.randint(2, 90), rng.randint(1, 10))
               for i in range(12)]
    seqs: list[Sequence] = []
    step = 0
    while pending or sched.has_work:
        step += 1
        assert step < 2000
        for item in [p for p in pending if p[0] <= step]:
            pending.remove(item)
            seqs.append(_arrive(sched, clock, item[1], item[2], seed, max_tokens=item[3]))
        plan = sched.schedule()
        assert plan.num_tokens <= budget
        decodes = [s for s in plan.scheduled if s.seq.num_uncomputed_tokens == 1]
        assert plan.scheduled[: len(decodes)] == decodes  # decodes always come first
        sched.postprocess(plan, model.execute(plan))
        clock.now += 0.5
    for seq in seqs:
        assert seq.output_token_ids == expected_output(seq), seq.request_id
