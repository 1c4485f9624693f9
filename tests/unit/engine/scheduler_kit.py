"""Shared builders for the scheduler tests: sequences, schedulers, a fake model."""


from __future__ import annotations

import random
from dataclasses import dataclass, field

from moeflow.domain.messages import SamplingParams
from moeflow.engine.block_manager import BlockManager
from moeflow.engine.scheduler import Scheduler, StepPlan
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


