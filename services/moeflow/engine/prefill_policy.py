"""Which prompts get prefill tokens first (pure: plain data in, a decision out).

Two decisions the scheduler asks about every step:

- ``prefill_order``: shortest remaining prefill first, with aging. A step's token budget goes to
  the prompts closest to their first token, so a burst of short prompts is not stuck behind one
  long chunked prefill (its chunks would otherwise take the whole budget for many steps). A
  prompt that has waited ``max_wait_s`` since it arrived is *aged*: aged prompts go before all
  others, oldest first, so a long prompt is never starved; it waits at most ``max_wait_s``
  longer than strict arrival order would have made it wait. ``max_wait_s = 0`` is arrival order.
- ``waits_for_shared_prefix``: a prompt whose leading full blocks another sequence is computing
  right now (the ``n`` choices of one request, or any two requests with one system prompt)
  waits until that sequence has computed them, then takes them from the prefix cache instead of
  computing them a second time in the same step. Only the blocks past the shared prefix, at
  least the last partial block, are computed again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillCandidate:
    """A prompt that still needs prefill tokens: running (partly prefilled) or waiting."""

    remaining_tokens: int
    arrival_s: float


def prefill_order(candidates: Sequence[PrefillCandidate], *, now_s: float,
                  max_wait_s: float) -> list[int]:
    """Indices of ``candidates`` in the order the step's token budget should go to them.

    Aged candidates (waited at least ``max_wait_s``) first, oldest first; then the others by
    fewest remaining tokens, ties by arrival. The sort is stable, so equal keys keep the
    caller's order."""

    def key(i: int) -> tuple[int, float, float]:
        c = candidates[i]
        if now_s - c.arrival_s >= max_wait_s:
            return (0, c.arrival_s, 0.0)
        return (1, float(c.remaining_tokens), c.arrival_s)

    return sorted(range(len(candidates)), key=key)


def waits_for_shared_prefix(token_ids: Sequence[int],
                            computing: Iterable[tuple[Sequence[int], int]],
                            block_size: int) -> bool:
    """Whether a prompt should wait for another sequence's prefill instead of computing now.

    ``computing``: (token ids, computed token count) of each sequence whose prompt KV is being
    computed (or fetched) now. Blocks a sequence has computed are in the prefix index already;
    the prompt waits only if it shares at least one *more* full block with such a sequence,
    one that the prefix cache could give it (never its last token: that one is always
    computed, for its logits)."""
    matchable = (len(token_ids) - 1) // block_size
    for other, num_computed in computing:
        blocks = num_computed // block_size + 1  # the first block ``other`` has not indexed
        end = blocks * block_size
        if blocks <= matchable and end <= len(other) and (
                list(token_ids[:end]) == list(other[:end])):
            return True
    return False
