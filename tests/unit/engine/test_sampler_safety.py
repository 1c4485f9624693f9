"""Every value SamplingParams accepts gives a token: no inf/nan reaches torch.multinomial.

The documented rule (moeflow.engine.sampler): temperature < 1e-5 and top_p * vocab <= 1 are
greedy; everything else is computed from max-shifted logits; non-finite logits give
INVALID_TOKEN for that row only.
"""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.domain.messages import SamplingParams
from moeflow.engine.sampler import (
    GREEDY_TEMPERATURE,
    INVALID_TOKEN,
    is_effectively_greedy,
    make_generator,
    sample,
)

torch.set_num_threads(1)

VOCAB = 64
LOGITS = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(0)) * 6

TINY = [1e-45, 1e-38, 5e-324, 1e-300, 1e-10, 9.99e-6]


@pytest.mark.parametrize("temperature", TINY)
def test_tiny_temperatures_are_greedy(temperature: float) -> None:
    params = SamplingParams(temperature=temperature, seed=1)
    assert is_effectively_greedy(params, VOCAB)
    assert make_generator(params) is None
    assert sample(LOGITS, [params] * 8, [None] * 8) == LOGITS.argmax(-1).tolist()


@pytest.mark.parametrize("top_p", [1e-300, 1e-30, 1 / VOCAB])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_a_nucleus_that_can_hold_one_token_only_is_greedy(top_p: float,
                                                           temperature: float) -> None:
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=5)
    assert is_effectively_greedy(params, VOCAB)
    assert sample(LOGITS, [params] * 8, [make_generator(params)] * 8) == \
        LOGITS.argmax(-1).tolist()


def test_just_above_the_threshold_still_samples_and_never_fails() -> None:
    params = SamplingParams(temperature=GREEDY_TEMPERATURE, seed=9)
    assert not is_effectively_greedy(params, VOCAB)
    # at T = 1e-5 the tempered distribution is one-hot for any realistic logit gap
    assert sample(LOGITS, [params] * 8, [make_generator(params)] * 8) == \
        LOGITS.argmax(-1).tolist()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=2.0, top_k=10**12, seed=2**64 - 1),
    SamplingParams(temperature=2.0, top_p=0.5, top_k=VOCAB),
    SamplingParams(temperature=1e-4, top_p=1e-3, seed=-(2**63)),
])
def test_hostile_combinations_give_valid_tokens(params: SamplingParams) -> None:
    generator = make_generator(params)
    for _ in range(20):
        tokens = sample(LOGITS, [params] * 8, [generator] * 8)
        assert all(0 <= t < VOCAB for t in tokens)


def test_huge_logit_gaps_do_not_overflow() -> None:
    """(logit - max) / T is <= 0 and the best is exactly 0: no inf - inf, no 0/0."""
    logits = torch.tensor([[3e38, -3e38, 0.0, 1.0], [-3e38, -3e38, -3e38, 5.0],
                           [1e30, 1e30, -math.inf, 0.0]])
    params = SamplingParams(temperature=1e-4, seed=0)
    generator = make_generator(params)
    for _ in range(20):
        tokens = sample(logits, [params] * 3, [generator] * 3)
        assert tokens[0] == 0 and tokens[1] == 3 and tokens[2] in (0, 1)


def test_non_finite_logits_fail_only_their_row() -> None:
    logits = LOGITS[:4].clone()
    logits[1, 3] = float("nan")
    logits[2, 5] = float("inf")
    logits[3] = float("-inf")
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=1)):
        tokens = sample(logits, [params] * 4, [make_generator(params)] * 4)
        assert tokens[1:] == [INVALID_TOKEN] * 3
        assert 0 <= tokens[0] < VOCAB
    assert sample(logits, [SamplingParams(temperature=0.0)] * 4, [None] * 4)[0] == \
        int(LOGITS[0].argmax())
