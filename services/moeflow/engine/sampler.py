"""Next-token choice for a batch: greedy, temperature, top-k, top-p, per-request seeds.

Greedy rows take ``argmax`` of float32 logits, exactly what ``transformers`` does with
``do_sample=False``. A request with a ``seed`` draws from its own ``torch.Generator``, so its
output does not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moeflow.domain.messages import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.is_greedy or params.seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed)
    return generator


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row of float32 logits [V]."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop tokens once the mass *before* them already reaches top_p; keep at least one
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,  # [B, V] float32
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    greedy = logits.argmax(dim=-1).tolist()
    token_ids: list[int] = []
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.is_greedy:
            token_ids.append(int(greedy[row]))
            continue
        probs = _filter(logits[row], p).softmax(-1)
        token_ids.append(int(torch.multinomial(probs, 1, generator=generator).item()))
    return token_ids
