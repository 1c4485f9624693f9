"""Scheduler: decode-first continuous batching, chunked prefill, finishing, abort, preemption.

The end-to-end tests drive the scheduler with a fake model that keeps a fake KV cache (the token
id stored in each slot) and samples ``(sum of the context's token ids) % 50 + 3`` from what it
reads back through the block table, so a wrong block table, a reused block holding other
tokens, or a lost token changes the output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from moeflow.common.messages import SamplingParams
from moeflow.engine.block_manager import BlockManager
from moeflow.engine.scheduler import Scheduler, StepPlan, max_blocks_per_seq
from moeflow.engine.sequence import Sequence, SequenceStatus

BS = 4


def make_seq(
    request_id: str,
    prompt: list[int],
    *,
    max_tokens: int = 8,
    eos: frozenset[int] = frozenset(),
    stop_token_ids: tuple[int, ...] = (),
    ignore_eos: bool = False,
) -> Sequence:
    return Sequence(
        request_id=request_id,
        prompt_token_ids=list(prompt),
        sampling=SamplingParams(
            max_tokens=max_tokens, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos
        ),
        eos_token_ids=eos,
        arrival_s=0.0,
    )


def make_scheduler(
    num_blocks: int = 64,
    *,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    prefix_caching: bool = False,
) -> Scheduler:
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=prefix_caching)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)


def next_token(context: list[int]) -> int:
    return sum(context) % 50 + 3


def sample_completed(plan: StepPlan) -> dict[str, int]:
    """A model that does not look at the cache: sample for every sequence the step completes."""
    return {
        s.seq.request_id: next_token(s.seq.token_ids)
        for s in plan.scheduled
        if s.completes_sequence
    }


def entries(plan: StepPlan) -> list[tuple[str, int]]:
    return [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled]


def run_step(sched: Scheduler) -> tuple[StepPlan, list[Sequence]]:
    plan = sched.schedule()
    return plan, sched.postprocess(plan, sample_completed(plan))


@dataclass
class FakeModel:
    """Writes each computed token into its KV slot; samples from the slots it reads back."""

    num_blocks: int
    block_size: int
    kv: list[int | None] = field(init=False)

    def __post_init__(self) -> None:
        self.kv = [None] * (self.num_blocks * self.block_size)

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, plan: StepPlan) -> dict[str, int]:
        sampled: dict[str, int] = {}
        for item in plan.scheduled:
            seq = item.seq
            start, end = item.start_pos, item.start_pos + item.num_new_tokens
            assert end <= seq.num_tokens
            assert len(seq.block_table) * self.block_size >= end, "no slot for a scheduled token"
            for pos in range(start, end):
                self.kv[self.slot(seq, pos)] = seq.token_ids[pos]
            if item.completes_sequence:
                context = [self.kv[self.slot(seq, pos)] for pos in range(end)]
                assert context == seq.token_ids, f"{seq.request_id}: KV cache holds other tokens"
                sampled[seq.request_id] = next_token(seq.token_ids)
        return sampled


def expected_output(seq: Sequence) -> list[int]:
    """What a sequence must produce, computed without any scheduler."""
    tokens = list(seq.prompt_token_ids)
    out: list[int] = []
    for _ in range(seq.sampling.max_tokens):
        t = next_token(tokens)
        tokens.append(t)
        out.append(t)
        if t in seq.sampling.stop_token_ids or (
            not seq.sampling.ignore_eos and t in seq.eos_token_ids
        ):
            break
    return out


@dataclass
class RunResult:
    outputs: dict[str, list[int]]
    finish_reasons: dict[str, str | None]
    num_steps: int
    num_preemptions: int


def run_to_completion(
    seqs: list[Sequence],
    *,
    num_blocks: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    prefix_caching: bool,
    max_steps: int = 5000,
) -> RunResult:
    sched = make_scheduler(
        num_blocks,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        prefix_caching=prefix_caching,
    )
    bm = sched.block_manager
    model = FakeModel(num_blocks, BS)
    for seq in seqs:
        sched.add(seq)
    finished: list[Sequence] = []
    steps = 0
    while sched.has_work:
        steps += 1
        assert steps <= max_steps, "the scheduler stopped making progress"
        plan = sched.schedule()
        assert not plan.is_empty, "work is pending but nothing was scheduled"
        assert plan.num_tokens <= max_num_batched_tokens
        assert len(sched.running) <= max_num_seqs
        ids = [s.seq.request_id for s in plan.scheduled]
        assert len(ids) == len(set(ids))
        assert all(s.num_new_tokens >= 1 for s in plan.scheduled)
        assert all(s.seq.status is SequenceStatus.RUNNING for s in plan.scheduled)
        for victim in plan.preempted:
            assert victim not in [s.seq for s in plan.scheduled] or victim in sched.running
            if victim not in sched.running:  # else it was readmitted in the same step
                assert victim.block_table == []
                assert victim.num_computed_tokens == 0
                assert victim in sched.waiting
        finished += sched.postprocess(plan, model.execute(plan))
        held = {b for s in sched.running for b in s.block_table}
        assert bm.num_free_blocks + len(held) == num_blocks, "a block leaked"
    assert bm.num_free_blocks == num_blocks
    assert sorted(s.request_id for s in finished) == sorted(s.request_id for s in seqs)
    return RunResult(
        outputs={s.request_id: list(s.output_token_ids) for s in seqs},
        finish_reasons={s.request_id: s.finish_reason for s in seqs},
        num_steps=steps,
        num_preemptions=sched.num_preemptions_total,
    )


def random_workload(seed: int, *, shared_prefix: bool) -> list[Sequence]:
    rng = random.Random(seed)
    common = [rng.randrange(100) for _ in range(2 * BS)]
    seqs = []
    for i in range(rng.randint(6, 10)):
        own = [rng.randrange(100) for _ in range(rng.randint(1, 14))]
        prompt = (common[: rng.randint(0, 2 * BS)] + own) if shared_prefix else own
        seqs.append(
            make_seq(
                f"req-{i}",
                prompt,
                max_tokens=rng.randint(1, 16),
                eos=frozenset({7}),
                stop_token_ids=(11,) if i % 3 == 0 else (),
            )
        )
    return seqs


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


def test_abort_of_a_preempted_request_leaves_no_blocks_behind() -> None:
    sched, old, new = preemption_setup()
    plan = sched.schedule()
    assert plan.preempted == [new]
    assert sched.abort("new") is new
    assert new.finish_reason == "abort"
    sched.postprocess(plan, sample_completed(plan))
    sched.abort("old")
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


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
        num_blocks=max_blocks_per_seq(2 * BS + 14 + 16, BS) + 1,
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
    from moeflow.common.messages import SamplingParams
    from moeflow.engine.block_manager import BlockManager
    from moeflow.engine.scheduler import Scheduler
    from moeflow.engine.sequence import Sequence, SequenceStatus

    manager = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=True)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=64)
    sampling = SamplingParams(max_tokens=4, temperature=0.0)

    def remote(rid: str, n: int) -> Sequence:
        return Sequence(rid, list(range(1, n + 1)), sampling, frozenset(), 0.0,
                        is_remote_prefill=True)

    first, second = remote("a", 8), remote("b", 8)  # 2 blocks each; 5 blocks in all
    third = remote("c", 8)
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
