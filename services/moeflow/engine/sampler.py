"""Next-token choice for a batch: greedy, temperature, top-k, top-p, per-request seeds.

Greedy rows take ``argmax`` of float32 logits, exactly what ``transformers`` does with
``do_sample=False``. A request with a ``seed`` draws from its own ``torch.Generator``, so its
output does not depend on what else is in the batch.

Numerical safety (every value ``SamplingParams`` accepts must give a token, never an error):

- A request is *effectively greedy* (argmax, no draw) when ``SamplingParams.is_greedy``
  (temperature 0 or top_k 1), when ``temperature < GREEDY_TEMPERATURE`` (1e-5: dividing by
  such a value overflows float32 and the tempered distribution is one-hot in any case), or
  when ``top_p * vocab <= 1`` (the most likely token alone holds at least ``1 / vocab`` of the
  mass, so such a nucleus never keeps a second token).
- Otherwise the logits are shifted by their maximum before the division by the temperature,
  so every scaled logit is ``<= 0`` and the best one is exactly 0: ``exp`` cannot overflow,
  at least one probability is 1 before normalisation, and no ``inf - inf`` can appear.
  Probabilities come from ``softmax`` of those values (finite, summing to 1); top-k with
  ``k >= vocab`` keeps everything.
- A row whose logits are not finite (NaN or +inf: the model broke, which should not happen)
  gets ``INVALID_TOKEN`` instead of a token; the engine fails only that request.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moeflow.domain.messages import SamplingParams

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are treated as 0 (greedy)."""

INVALID_TOKEN = -1
"""Returned for a row whose logits are not finite; never a real token id."""


def is_effectively_greedy(params: SamplingParams, vocab_size: int) -> bool:
    """True when the request's distribution is one-hot on the argmax (see the module doc)."""
    return (
        params.is_greedy
        or params.temperature < GREEDY_TEMPERATURE
        or params.top_p * vocab_size <= 1.0
    )


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.is_greedy or params.temperature < GREEDY_TEMPERATURE or params.seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed)
    return generator


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row of finite float32 logits [V].

    Returns the tempered logits shifted so that the largest is 0 (log-probabilities up to a
    constant), with filtered ids at ``-inf``; the largest always survives. Needs
    ``params.temperature >= GREEDY_TEMPERATURE``.
    """
    logits = (logits - logits.max()) / params.temperature  # <= 0, the best exactly 0
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        cumulative = probs.cumsum(-1)
        # drop tokens once the mass *before* them already reaches top_p; keep at least one.
        # (compare in float64: a tiny top_p such as 1e-300 would round to 0 in float32)
        before = (cumulative - probs).double()
        drop_sorted = before >= params.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,  # [B, V] float32
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token id per row, or ``INVALID_TOKEN`` for a row whose logits are not finite."""
    vocab_size = logits.shape[-1]
    greedy = logits.argmax(dim=-1).tolist()
    finite = torch.isfinite(logits).logical_or(logits == float("-inf")).all(dim=-1)
    # a row of nothing but -inf has no token to pick either
    has_max = (logits.max(dim=-1).values > float("-inf")) if vocab_size else finite
    valid = finite.logical_and(has_max).tolist()
    token_ids: list[int] = []
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if not valid[row]:
            token_ids.append(INVALID_TOKEN)
        elif is_effectively_greedy(p, vocab_size):
            token_ids.append(int(greedy[row]))
        else:
            probs = _filter(logits[row], p).softmax(-1)
            token_ids.append(int(torch.multinomial(probs, 1, generator=generator).item()))
    return token_ids
