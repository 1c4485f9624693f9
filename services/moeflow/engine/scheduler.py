"""Continuous batching with chunked prefill (pure: plain data in, a step plan out).

Each step spends a token budget (``max_num_batched_tokens``): first one token for every running
sequence that is decoding, then prompt tokens: the chunks of prompts being prefilled and new
sequences from the bounded waiting queue share the rest, shortest remaining prefill first, and
a prompt that has waited ``prefill_max_wait_s`` goes before all others, oldest first
(``prefill_policy.prefill_order``), so short prompts do not queue behind a long one and a long
one is never starved. A waiting prompt whose leading full blocks another sequence is computing
now (the ``n`` choices of one request) waits for them and takes them from the prefix cache
(``prefill_policy.waits_for_shared_prefix``). When decode needs a block and none is free, the
newest running sequence is preempted (its blocks freed; it recomputes later), which keeps the
oldest requests moving. A sequence's tokens never change with the company it keeps: batching
decides *when* a token is computed, never *what* it is.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from moeflow.engine.block_manager import BlockManager
from moeflow.engine.prefill_policy import PrefillCandidate, prefill_order, waits_for_shared_prefix
from moeflow.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def start_pos(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def completes_sequence(self) -> bool:
        """After this step every token is computed, so the step samples the next one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class StepPlan:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    kv_pulls: list[Sequence] = field(default_factory=list)
    """Remote-prefill sequences that got their blocks this step: fetch their KV now."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefill_max_wait_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.block_manager = block_manager
        self.prefill_max_wait_s = prefill_max_wait_s
        self.clock = clock
        """Seconds, on the clock of ``Sequence.arrival_s``; tests pass their own."""
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.awaiting_kv: list[Sequence] = []
        self.num_preemptions_total = 0
        self.num_memory_waits_total = 0
        self.num_quarantines_total = 0
        """Steps that raised with several sequences, whose sequences were then isolated."""
        self._memory_waiters: set[str] = set()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_pending_prompt_tokens(self) -> int:
        """Prompt (or recompute) tokens still to compute: the prefill queue, in tokens."""
        waiting = sum(s.num_uncomputed_tokens for s in self.waiting if not s.is_remote_prefill)
        prefilling = sum(s.num_uncomputed_tokens for s in self.running
                         if s.num_uncomputed_tokens > 1)
        return waiting + prefilling

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is and free its blocks."""
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self._finish(seq, "abort")
                return seq
        for queue in (self.waiting, self.awaiting_kv):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, "abort")
                    return seq
        return None

    def quarantine(self, seqs: list[Sequence]) -> None:
        """A step that ran ``seqs`` together raised: recompute each of them, alone, until a
        step of its own succeeds (``schedule`` isolates suspects one at a time), so the one that
        makes steps fail is found and fails by itself, and the others lose nothing."""
        for seq in reversed(seqs):  # preemption puts each at the front: keep their order
            seq.is_suspect = True
            if seq in self.running:
                self._preempt(seq)
            elif seq in self.awaiting_kv:
                continue  # its KV has not arrived: it was not in the step's compute
        self.num_quarantines_total += 1

    def schedule(self) -> StepPlan:
        suspect = next((s for s in self.running if s.is_suspect), None) or next(
            (s for s in self.waiting if s.is_suspect), None)
        if suspect is not None:
            return self._schedule_alone(suspect)
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        # 1. Decodes (and prompt tails of exactly one token), oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_uncomputed_tokens != 1:
                i += 1
                continue
            if not self._make_room(seq, seq.num_tokens, plan):
                break  # seq itself was preempted: everything after it is gone too
            plan.scheduled.append(ScheduledSeq(seq, 1))
            budget -= 1
            i += 1
        # 2. Prompts: those being prefilled and waiting ones share what is left of the budget,
        # shortest remaining prefill first with aging (prefill_policy). A remote-prefill
        # sequence only reserves its blocks here (the decode side's back-pressure: the prefill
        # instance is asked for KV only once there is room for it); it computes nothing.
        self._schedule_prefills(plan, budget)
        return plan

    def _schedule_prefills(self, plan: StepPlan, budget: int) -> None:
        candidates = [s for s in self.running if s.num_uncomputed_tokens > 1]
        candidates += self.waiting
        order = prefill_order(
            [PrefillCandidate(0 if _is_fresh_remote(s) else s.num_uncomputed_tokens,
                              s.arrival_s) for s in candidates],
            now_s=self.clock(), max_wait_s=self.prefill_max_wait_s)
        # prompts whose KV is being computed or fetched now (see waits_for_shared_prefix)
        computing = [s for s in candidates if s.status is SequenceStatus.RUNNING]
        computing += self.awaiting_kv
        share = self.block_manager.enable_prefix_caching
        admitting = True
        for seq in (candidates[i] for i in order):
            if budget <= 0:
                break
            if seq.status is SequenceStatus.RUNNING:
                chunk = min(seq.num_uncomputed_tokens, budget)
                plan.scheduled.append(ScheduledSeq(seq, chunk))
                budget -= chunk
                continue
            if not admitting or len(self.running) + len(self.awaiting_kv) >= self.max_num_seqs:
                continue
            if share and waits_for_shared_prefix(
                    seq.token_ids,
                    # another adapter's K/V differs: its blocks are never shared (block_manager)
                    [(c.token_ids, c.num_computed_tokens) for c in computing
                     if c.adapter_id == seq.adapter_id],
                    self.block_manager.block_size):
                continue
            remote = _is_fresh_remote(seq)
            if not self.block_manager.allocate_prompt(seq):
                self._note_memory_wait(seq)
                admitting = False  # no admission passes a prompt that waits for memory
                continue
            self.waiting.remove(seq)
            computing.append(seq)
            if remote:
                # blocks from the prefix cache (a sibling's prompt) stay; the KV that arrives
                # fills the rest (LLMEngine.attach_kv)
                seq.status = SequenceStatus.AWAITING_KV
                self.awaiting_kv.append(seq)
                plan.kv_pulls.append(seq)
                continue
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunk = min(seq.num_uncomputed_tokens, budget)
            plan.scheduled.append(ScheduledSeq(seq, chunk))
            budget -= chunk

    def _schedule_alone(self, seq: Sequence) -> StepPlan:
        """A plan that computes only ``seq`` (its next prompt chunk or its next token)."""
        plan = StepPlan()
        if seq.status is SequenceStatus.WAITING:
            while not self.block_manager.allocate_prompt(seq):
                others = [s for s in self.running if not s.is_suspect]
                if not others:  # it cannot fit even alone: let normal scheduling decide
                    seq.is_suspect = False
                    return plan
                self._preempt(others[-1])
                plan.preempted.append(others[-1])
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        if seq.num_uncomputed_tokens == 1 and not self._make_room(seq, seq.num_tokens, plan):
            return plan
        chunk = min(seq.num_uncomputed_tokens, self.max_num_batched_tokens)
        plan.scheduled.append(ScheduledSeq(seq, chunk))
        return plan

    def _note_memory_wait(self, seq: Sequence) -> None:
        if seq.request_id not in self._memory_waiters:
            self._memory_waiters.add(seq.request_id)
            self.num_memory_waits_total += 1

    def _make_room(self, seq: Sequence, num_tokens: int, plan: StepPlan) -> bool:
        while not self.block_manager.ensure_slots(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            plan.preempted.append(victim)
            plan.scheduled = [s for s in plan.scheduled if s.seq is not victim]
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions_total += 1

    def kv_arrived(self, seq: Sequence) -> None:
        """The prompt's KV is in the sequence's blocks: it joins the running batch as computed."""
        self.awaiting_kv.remove(seq)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.block_manager.index_computed_blocks(seq)

    def postprocess(self, plan: StepPlan, sampled: dict[str, int]) -> list[Sequence]:
        """Advance computed counts, append sampled tokens; return sequences that finished."""
        finished: list[Sequence] = []
        for item in plan.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.index_computed_blocks(seq)
            token_id = sampled.get(seq.request_id)
            if token_id is None:
                continue
            seq.is_suspect = False  # a step of its own went through
            seq.append_token(token_id)
            if seq.finish_reason is not None:
                self.running.remove(seq)
                self._finish(seq, seq.finish_reason)
                finished.append(seq)
        return finished

    def finish_early(self, seq: Sequence, reason: str = "stop") -> None:
        """Stop a running sequence for a reason found outside (a stop string, a first token)."""
        if seq in self.running:
            self.running.remove(seq)
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._memory_waiters.discard(seq.request_id)
        seq.status = SequenceStatus.FINISHED
        if seq.finish_reason is None:
            seq.finish_reason = reason  # type: ignore[assignment]
        self.block_manager.free(seq)



def _is_fresh_remote(seq: Sequence) -> bool:
    """A waiting sequence whose prompt KV is to come from a prefill instance (not one that
    was preempted after its KV arrived: that one recomputes here)."""
    return (seq.status is SequenceStatus.WAITING and seq.is_remote_prefill
            and seq.num_computed_tokens == 0 and not seq.output_token_ids)
