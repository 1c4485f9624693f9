"""Expert load balancing (moeflow.engine.eplb): a hand-checked case, the placement contract over
random inputs, skewed workloads balance better than round robin, and live rebalancing plans."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from moeflow.engine.eplb import (
    Move,
    Placement,
    assign,
    balance,
    imbalance_ratio,
    instance_loads,
    plan_rebalance,
    replica_counts,
    round_robin,
)


def check_placement(p: Placement, num_experts: int, num_instances: int, budget: int) -> None:
    assert p.num_instances == num_instances and p.num_experts == num_experts
    for instance, hosted in enumerate(p.instances):
        assert len(hosted) <= p.slots, "capacity"
        assert list(hosted) == sorted(set(hosted)), "one replica of an expert per instance"
        assert all(instance in p.replicas(e) for e in hosted)
    assert p.num_replicas <= num_experts + budget, "budget"
    for expert in range(num_experts):
        replicas = p.replicas(expert)
        assert replicas, f"expert {expert} is not placed"
        assert all(expert in p.instances[i] for i in replicas)
        assert sum(share for _, share in p.shares[expert]) == pytest.approx(1.0)


def zipf_counts(rng: random.Random, num_experts: int) -> list[int]:
    exponent = rng.uniform(1.0, 1.6)
    counts = [int(100_000 / (rank + 1) ** exponent) for rank in range(num_experts)]
    rng.shuffle(counts)
    return counts


def random_case(seed: int) -> tuple[list[int], int, int, int]:
    """counts, num_instances, budget, slots; capacity ranges from exactly full to roomy."""
    rng = random.Random(seed)
    num_experts, num_instances = rng.randint(1, 40), rng.randint(1, 9)
    slots = -(-num_experts // num_instances) + rng.randint(0, 3)
    kind = rng.choice(["zipf", "uniform", "sparse"])
    if kind == "zipf":
        counts = zipf_counts(rng, num_experts)
    else:
        counts = [rng.randint(0, 1000) * (kind == "uniform" or rng.random() < 0.3)
                  for _ in range(num_experts)]
    return counts, num_instances, rng.randint(0, 2 * num_experts), slots


def test_hand_checked_case() -> None:
    # per-replica loads 60 20 10 10; the one spare replica goes to expert 0 (30 + 30).
    # Largest first: 0 -> instances 0 and 1 (30, 30); 1 -> instance 0 (tie, lower id) = 50;
    # 2 -> instance 1 = 40; 3 -> instance 1 = 50. Round robin: {0, 2} = 70 and {1, 3} = 30.
    counts = [60, 20, 10, 10]
    assert replica_counts(counts, 2, budget=1, slots=3) == [2, 1, 1, 1]
    placement = balance(counts, num_instances=2, budget=1, slots=3)
    assert placement.instances == ((0, 1), (0, 2, 3))
    assert placement.shares[0] == ((0, 0.5), (1, 0.5))
    assert placement.replicas(3) == (1,)
    assert instance_loads(placement, counts) == [50.0, 50.0]
    assert imbalance_ratio(instance_loads(placement, counts)) == 1.0
    naive = round_robin(4, 2, slots=3)
    assert naive.instances == ((0, 2), (1, 3))
    assert imbalance_ratio(instance_loads(naive, counts)) == pytest.approx(1.4)


def test_replica_counts_follow_per_replica_load_and_limits() -> None:
    # 100 -> 50 -> 33.3 -> 25 (4 = num_instances: no more), then 10 -> 5; budget spent.
    assert replica_counts([100, 10, 1], num_instances=4, budget=5, slots=4) == [4, 3, 1]
    assert replica_counts([0, 0], num_instances=4, budget=3, slots=2) == [1, 1], "idle experts"
    assert replica_counts([5, 1], num_instances=1, budget=3, slots=2) == [1, 1], "one instance"
    assert replica_counts([9, 9, 9], num_instances=2, budget=9, slots=2) == [2, 1, 1], "capacity"


def test_tight_capacity_never_paints_itself_into_a_corner() -> None:
    # Least-loaded placement would fill instance 1 with experts 1, 2 and 3 and leave expert 4's
    # two replicas only instance 0; the capacity check sends expert 3 to instance 0 instead.
    placement = assign([10, 1, 1, 1, 1], [1, 1, 1, 1, 2], num_instances=2, slots=3)
    assert placement.instances == ((0, 3, 4), (1, 2, 4))


def test_assign_places_any_feasible_replica_counts() -> None:
    # arbitrary replica counts (not only the greedy's) up to exactly full capacity
    for seed in range(500):
        rng = random.Random(seed)
        num_instances, num_experts = rng.randint(1, 6), rng.randint(1, 20)
        slots = -(-num_experts // num_instances) + rng.randint(0, 2)
        replicas = [1] * num_experts
        for _ in range(rng.randint(0, num_instances * slots - num_experts)):
            expert = rng.randrange(num_experts)
            replicas[expert] = min(num_instances, replicas[expert] + 1)
        counts = [rng.randint(0, 100) for _ in range(num_experts)]
        placement = assign(counts, replicas, num_instances, slots)
        check_placement(placement, num_experts, num_instances, sum(replicas) - num_experts)
        assert [len(placement.replicas(e)) for e in range(num_experts)] == replicas


def seeds(chunk: int, size: int) -> range:
    """Seeds in chunks: one pytest case per chunk keeps hundreds of random cases cheap (a
    failing assertion shows the local `seed`)."""
    return range(chunk * size, (chunk + 1) * size)


@pytest.mark.parametrize("chunk", range(4))
def test_placement_contract_on_random_inputs(chunk: int) -> None:
    for seed in seeds(chunk, 100):
        counts, num_instances, budget, slots = random_case(seed)
        placement = balance(counts, num_instances, budget, slots)
        check_placement(placement, len(counts), num_instances, budget)
        assert sum(instance_loads(placement, counts)) == pytest.approx(sum(counts)), seed


@pytest.mark.parametrize("seed", range(50))
def test_skewed_workloads_balance_better_than_round_robin(seed: int) -> None:
    rng = random.Random(seed)
    num_instances, per_instance = rng.choice([2, 4, 8]), rng.randint(2, 8)
    num_experts = num_instances * per_instance
    counts = zipf_counts(rng, num_experts)
    balanced = balance(counts, num_instances, budget=num_instances, slots=per_instance + 2)
    check_placement(balanced, num_experts, num_instances, num_instances)
    naive = round_robin(num_experts, num_instances, slots=per_instance)
    balanced_ratio = imbalance_ratio(instance_loads(balanced, counts))
    assert balanced_ratio < imbalance_ratio(instance_loads(naive, counts))
    assert balanced_ratio < 1.25


def apply(
    placement: Placement, moves: Sequence[Move], num_experts: int
) -> tuple[list[set[int]], int]:
    """Apply moves one by one, checking the live invariants; return the sets and peak size."""
    state = [set(h) for h in placement.instances]
    peak = max(len(h) for h in state)
    for move in moves:
        hosted = state[move.instance]
        if move.action == "add":
            assert move.expert not in hosted
            hosted.add(move.expert)
        else:
            assert move.expert in hosted
            hosted.discard(move.expert)
        peak = max(peak, len(hosted))
        assert set().union(*state) == set(range(num_experts)), "an expert went unhosted"
    return state, peak


def test_unchanged_counts_need_no_moves() -> None:
    counts = zipf_counts(random.Random(7), 16)
    current = balance(counts, num_instances=4, budget=4, slots=6)
    placement, moves = plan_rebalance(current, counts, budget=4)
    assert placement == current and moves == []


@pytest.mark.parametrize("chunk", range(4))
def test_rebalance_moves_reach_the_plan_and_keep_experts_served(chunk: int) -> None:
    for seed in seeds(chunk, 75):
        check_rebalance(seed)


def check_rebalance(seed: int) -> None:
    counts, num_instances, budget, slots = random_case(seed)
    rng = random.Random(seed + 10_000)
    current = balance(counts, num_instances, budget, slots)
    if rng.random() < 0.5 and -(-len(counts) // num_instances) <= slots:
        current = round_robin(len(counts), num_instances, slots)
    shifted = counts[:]
    rng.shuffle(shifted)  # the hot experts change
    placement, moves = plan_rebalance(current, shifted, budget)
    check_placement(placement, len(counts), num_instances, budget)
    fresh = balance(shifted, num_instances, budget, slots)
    assert sorted(instance_loads(placement, shifted)) == sorted(instance_loads(fresh, shifted))
    state, peak = apply(current, moves, len(counts))
    assert [sorted(h) for h in state] == [list(h) for h in placement.instances]
    assert peak <= slots + 1, "at most one extra expert, and only transiently"
    pairs = zip(current.instances, fresh.instances, strict=True)
    naive_moves = sum(len(set(a) ^ set(b)) for a, b in pairs)
    assert len(moves) <= naive_moves, "renumbering instances never costs moves"


def test_swap_between_full_instances_overflows_one_slot_transiently() -> None:
    current = Placement(instances=((0,), (1,)), shares=(((0, 1.0),), ((1, 1.0),)), slots=1)
    # fresh placement puts the hot expert 1 first, on instance 0; renumbering keeps both in place
    placement, moves = plan_rebalance(current, [1, 100], budget=0)
    assert moves == [] and placement == current
    swap = Placement(instances=((0, 1), (2, 3)), shares=(((0, 1.0),), ((0, 1.0),), ((1, 1.0),),
                     ((1, 1.0),)), slots=2)
    placement, moves = plan_rebalance(swap, [40, 30, 20, 10], budget=0)
    assert placement.instances == ((0, 3), (1, 2))  # 50 / 50 instead of 70 / 30
    state, peak = apply(swap, moves, 4)
    assert peak == 3 and [sorted(h) for h in state] == [[0, 3], [1, 2]]
    assert moves[0].action == "add"


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        balance([1] * 7, num_instances=2, budget=0, slots=3)
    with pytest.raises(ValueError):
        balance([1, -1], num_instances=2, budget=0, slots=1)
    with pytest.raises(ValueError):
        assign([1, 1], [3, 1], num_instances=2, slots=2)
    with pytest.raises(ValueError):
        imbalance_ratio([])
    assert imbalance_ratio([0.0, 0.0]) == 1.0
    with pytest.raises(ValueError):
        plan_rebalance(round_robin(4, 2, 2), [1, 2, 3], budget=0)
