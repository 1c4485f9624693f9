"""Per-request state inside an engine instance (no torch)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from moeflow.domain.messages import FinishReason, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    AWAITING_KV = "awaiting_kv"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens and KV blocks.

    ``num_computed_tokens`` counts tokens whose KV is in the cache (prefix-cache hits included);
    the next step computes tokens from there. ``block_table`` maps logical blocks to cache
    blocks. A preempted sequence goes back to WAITING with its blocks freed and recomputes.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: frozenset[int]
    arrival_s: float
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    adapter_id: int = 0
    """The LoRA adapter it is served with (``AdapterStore`` id), 0 for the base model."""
    is_remote_prefill: bool = False
    """Decode role: the prompt's KV comes from a prefill instance, not from computing it."""
    exports_kv: bool = False
    is_suspect: bool = False
    """It was in a step that raised with other sequences: it runs alone (isolated) until a
    step of its own succeeds, so that a failing request fails by itself."""
    """Prefill role: copy the prompt's KV out when its prefill completes."""

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Record a sampled token and decide whether the sequence is done."""
        self.output_token_ids.append(token_id)
        num_output = len(self.output_token_ids)
        stops = self.sampling.stop_token_ids
        if token_id in stops or (not self.sampling.ignore_eos and token_id in self.eos_token_ids):
            self.finish_reason = "stop"
        elif num_output >= self.sampling.max_tokens:
            self.finish_reason = "length"
