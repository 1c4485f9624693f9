"""Sampler: greedy argmax, per-request seeds, temperature, top-k and top-p filtering."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.domain.messages import SamplingParams
from moeflow.engine.sampler import _filter, make_generator, sample

torch.set_num_threads(1)

# A fixed distribution over 6 ids, sorted by id for readability: probabilities
# 0.40, 0.25, 0.15, 0.10, 0.06, 0.04 (cumulative 0.40, 0.65, 0.80, 0.90, 0.96, 1.00).
PROBS = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
LOGITS = PROBS.log()
# The same distribution with ids shuffled, so "top" never simply means "lowest id".
PERM = torch.tensor([3, 0, 5, 1, 4, 2])  # SHUFFLED[PERM[i]] = LOGITS[i]
SHUFFLED = torch.empty(6).scatter(0, PERM, LOGITS)


def draws(params: SamplingParams, logits: torch.Tensor, n: int) -> list[int]:
    """``n`` draws for one request (one seeded generator), batched as n identical rows."""
    generator = make_generator(params)
    return sample(logits.expand(n, -1), [params] * n, [generator] * n)


def support(params: SamplingParams, logits: torch.Tensor, n: int = 800) -> set[int]:
    return set(draws(params, logits, n))


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0)] * 5
    assert sample(logits, params, [None] * 5) == logits.argmax(-1).tolist()


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.7, top_k=1, seed=3)
    assert params.is_greedy
    assert make_generator(params) is None
    assert sample(logits, [params] * 4, [None] * 4) == logits.argmax(-1).tolist()


def test_make_generator_only_for_seeded_sampling() -> None:
    assert make_generator(SamplingParams(temperature=0.0, seed=1)) is None
    assert make_generator(SamplingParams(temperature=1.0)) is None
    assert isinstance(make_generator(SamplingParams(temperature=1.0, seed=1)), torch.Generator)


def test_seeded_sampling_is_reproducible() -> None:
    params = SamplingParams(temperature=1.0, seed=1234)
    logits = torch.randn(64, generator=torch.Generator().manual_seed(2))
    first = draws(params, logits, 50)
    assert draws(params, logits, 50) == first
    assert len(set(first)) > 5  # it really samples
    assert draws(SamplingParams(temperature=1.0, seed=4321), logits, 50) != first


def test_a_seeded_request_draws_the_same_tokens_whatever_else_is_in_the_batch() -> None:
    vocab = 40
    rows = torch.randn(6, vocab, generator=torch.Generator().manual_seed(5))
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=77)

    def steps(company: list[SamplingParams], position: int) -> list[int]:
        target_gen = make_generator(target)
        others = [make_generator(p) for p in company]
        out = []
        for step in range(6):
            params = list(company)
            gens = list(others)
            params.insert(position, target)
            gens.insert(position, target_gen)
            batch = torch.stack([rows[(step + i) % 6] for i in range(len(params))])
            batch[position] = rows[step]  # the target always sees the same logits
            out.append(sample(batch, params, gens)[position])
        return out

    alone = steps([], 0)
    crowd = [
        SamplingParams(temperature=1.0),  # unseeded: uses the global RNG
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, seed=1, top_k=5),
    ]
    torch.manual_seed(0)
    assert steps(crowd, 0) == alone
    torch.manual_seed(1)
    assert steps(crowd, 2) == alone
    assert steps(crowd[:1], 1) == alone


def test_top_k_restricts_draws_to_the_k_most_likely_ids() -> None:
    params = SamplingParams(temperature=1.0, top_k=3, seed=0)
    assert support(params, SHUFFLED) == {int(PERM[i]) for i in range(3)}


def test_top_k_larger_than_the_vocabulary_keeps_everything() -> None:
    params = SamplingParams(temperature=1.0, top_k=100, seed=0)
    assert support(params, SHUFFLED) == set(range(6))


@pytest.mark.parametrize(
    ("top_p", "num_kept"),
    [(0.3, 1), (0.5, 2), (0.7, 3), (0.85, 4), (0.93, 5), (0.99, 6)],
)
def test_top_p_keeps_the_smallest_nucleus_reaching_p(top_p: float, num_kept: int) -> None:
    params = SamplingParams(temperature=1.0, top_p=top_p, seed=0)
    assert support(params, SHUFFLED) == {int(PERM[i]) for i in range(num_kept)}


def test_top_p_always_keeps_the_most_likely_id() -> None:
    logits = torch.tensor([5.0, 0.0, 0.0, 0.0])  # p(0) ~ 0.98
    params = SamplingParams(temperature=1.0, top_p=0.01, seed=0)
    assert support(params, logits, 200) == {0}


def test_top_k_applies_before_top_p() -> None:
    # top_k=4 renormalises to 0.4/0.9, 0.25/0.9, ...: cumulative 0.44, 0.72, 0.89, 1.0
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.75, seed=0)
    assert support(params, SHUFFLED) == {int(PERM[i]) for i in range(3)}


@pytest.mark.parametrize("temperature", [0.25, 0.5, 1.0, 1.5, 2.0])
def test_temperature_divides_the_logits(temperature: float) -> None:
    params = SamplingParams(temperature=temperature)
    filtered = _filter(LOGITS, params)
    # log-probabilities up to a constant: shifted so the best is 0 (no overflow, no inf - inf)
    assert torch.allclose(filtered, (LOGITS - LOGITS.max()) / temperature)
    expected = (PROBS ** (1 / temperature)) / (PROBS ** (1 / temperature)).sum()
    assert torch.allclose(filtered.softmax(-1), expected, atol=1e-6)


def test_draw_frequencies_follow_the_tempered_distribution() -> None:
    n = 2000
    for temperature in (0.5, 1.0):
        params = SamplingParams(temperature=temperature, seed=11)
        counts = torch.bincount(torch.tensor(draws(params, LOGITS, n)), minlength=6).double()
        expected = (PROBS.double() ** (1 / temperature)) / (
            PROBS.double() ** (1 / temperature)
        ).sum()
        # 5 standard deviations of a binomial count: a fixed seed, so this is not flaky anyway
        tolerance = 5 * torch.sqrt(n * expected * (1 - expected))
        assert torch.all((counts - n * expected).abs() <= tolerance), (temperature, counts)


def test_lower_temperature_concentrates_on_the_most_likely_id() -> None:
    cold = draws(SamplingParams(temperature=0.1, seed=2), LOGITS, 500)
    hot = draws(SamplingParams(temperature=2.0, seed=2), LOGITS, 500)
    assert cold.count(0) > 480
    assert hot.count(0) < 300


def test_every_seed_sampling_params_accepts_can_seed_a_generator() -> None:
    """A request seed that torch cannot take raises inside the engine loop's sampling step.

    ``SamplingParams.seed`` is an unbounded int, and ``torch.Generator.manual_seed`` accepts
    only [-2**63, 2**64 - 1]; the ValueError would surface in ``ModelRunner.execute``, i.e. in
    ``AsyncEngine._run``, whose handler fails *every* in-flight request. A seed must be either
    refused by validation or usable.
    """
    for seed in (-(2**63) - 1, 2**64, 10**30):
        try:
            params = SamplingParams(temperature=1.0, seed=seed)
        except ValueError:  # pydantic.ValidationError is a ValueError: refused up front, fine
            continue
        make_generator(params)  # must not raise


def test_sampling_never_returns_a_filtered_id_even_with_extreme_logits() -> None:
    logits = torch.tensor([30.0, 29.0, -30.0, -math.inf, 0.0])
    params = SamplingParams(temperature=2.0, top_k=2, seed=5)
    assert support(params, logits, 500) == {0, 1}
