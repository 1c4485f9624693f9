"""The replica split of an expert's pairs (``replica_choice``, ``ExpertMap.plan``): exact shares,
across calls, so measured instance loads match what the planner (``eplb``) predicts."""

from __future__ import annotations

import torch

from moeflow.engine import eplb
from moeflow.engine.ae.expert_client import imbalance
from moeflow.engine.ae.expert_map import ExpertMap, replica_choice


def test_an_experts_pairs_take_its_replicas_in_turn_across_calls() -> None:
    replicas = torch.tensor([2, 1, 3])
    offsets = torch.zeros(3, dtype=torch.int64)
    choice, offsets = replica_choice(torch.tensor([0, 2, 0, 1, 2, 0, 2]), replicas, offsets)
    assert choice.tolist() == [0, 0, 1, 0, 1, 0, 2]
    assert offsets.tolist() == [1, 0, 0]
    # the next call continues where this one stopped: expert 0's next pair takes replica 1
    choice, offsets = replica_choice(torch.tensor([0, 0, 2]), replicas, offsets)
    assert choice.tolist() == [1, 0, 0]
    assert offsets.tolist() == [1, 0, 1]


def test_top1_and_top2_pairs_no_longer_map_to_fixed_replicas() -> None:
    """k = 2, expert 0 (2 replicas) always in slot 0, pairs flattened as ExpertClient sends
    them: the old `pair_index % replicas` sent every one of its pairs to replica 0 (even pair
    indices); now they alternate."""
    m = ExpertMap([[0, 1], [0, 2]], 3)
    pairs = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 2]]).reshape(-1, 1)
    plan = m.plan(pairs)
    expert0 = {j: [int(t) for t in plan.tokens[j] if int(pairs[t, 0]) == 0] for j in plan.tokens}
    assert expert0 == {0: [0, 4], 1: [2, 6]}


def test_many_small_micro_batches_split_exactly() -> None:
    """One pair of the hot expert per call: `index % replicas` would put all on replica 0."""
    m = ExpertMap([[0], [0], [0, 1]], 2)
    pairs = [0, 0, 0]
    for _ in range(30):
        plan = m.plan(torch.tensor([[0]]))
        (j,) = plan.tokens
        pairs[j] += 1
    assert pairs == [10, 10, 10]


def test_measured_loads_match_the_planners_prediction() -> None:
    """Skewed counts, the planner's placement, pairs routed in small random micro-batches: the
    measured imbalance equals the predicted one within a pair or two."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.tensor([40.0, 20, 10, 5, 5, 2, 1, 1])
    batches = [torch.multinomial(weights, 8, replacement=False, generator=gen)[:2][None]
               for _ in range(500)]  # top-2 pairs of one token per call
    counts = torch.bincount(torch.cat(batches).flatten(), minlength=8).tolist()
    placement = eplb.balance(counts, num_instances=4, budget=4, slots=4)
    predicted = eplb.imbalance_ratio(eplb.instance_loads(placement, counts))
    m = ExpertMap(placement.instances, 8)
    loads = [0, 0, 0, 0]
    for expert_ids in batches:
        plan = m.plan(expert_ids)
        for j, tokens in plan.tokens.items():
            loads[j] += int(tokens.numel())
    assert sum(loads) == 1000
    assert abs(imbalance(loads) - predicted) < 0.01
