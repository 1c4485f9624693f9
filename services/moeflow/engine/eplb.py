"""Expert-parallel load balancing (EPLB): which expert instance hosts which expert replicas.

Pure Python (no torch): inputs are per-expert token counts (e.g. the router's top-k hits over a
window), outputs are plain data an attention instance can route by and a live reconfiguration
can apply. Terms: E experts, N expert instances, `slots` experts one instance can hold,
`budget` extra replicas allowed in total (beyond one per expert).

Contracts shared by every function here:
- counts: E >= 1 non-negative ints; num_instances >= 1; slots >= 1; budget >= 0;
  E <= num_instances * slots (else every expert cannot be placed). Violations: `ValueError`.
- A `Placement` hosts every expert at least once, at most once per instance, on at most
  `slots` experts per instance; each expert's replicas split its tokens evenly (share 1/r).
- Deterministic: ties break by the lower expert id, then the lower instance id.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Placement:
    instances: tuple[tuple[int, ...], ...]
    """Expert ids hosted by each instance (index = instance id), ascending."""
    shares: tuple[tuple[tuple[int, float], ...], ...]
    """Per expert id: (instance, share of that expert's tokens) per replica, by instance; the
    shares of one expert sum to 1 (up to float rounding)."""
    slots: int
    """How many experts one instance can hold."""

    @property
    def num_instances(self) -> int:
        return len(self.instances)

    @property
    def num_experts(self) -> int:
        return len(self.shares)

    @property
    def num_replicas(self) -> int:
        return sum(len(hosted) for hosted in self.instances)

    def replicas(self, expert: int) -> tuple[int, ...]:
        """The instances hosting `expert`, ascending."""
        return tuple(instance for instance, _ in self.shares[expert])


@dataclass(frozen=True)
class Move:
    """One step of a live reconfiguration: copy an expert's weights onto an instance (add) or
    drop them from it (remove)."""

    action: Literal["add", "remove"]
    expert: int
    instance: int


def _check(counts: Sequence[int], num_instances: int, slots: int, budget: int = 0) -> None:
    if not counts or any(c < 0 for c in counts):
        raise ValueError("counts must be a non-empty list of non-negative token counts")
    if num_instances < 1 or slots < 1 or budget < 0:
        raise ValueError("need num_instances >= 1, slots >= 1 and budget >= 0")
    if len(counts) > num_instances * slots:
        raise ValueError(f"{len(counts)} experts do not fit {num_instances} x {slots} slots")


def _placement(hosted: Sequence[set[int]], num_experts: int, slots: int) -> Placement:
    holders: list[list[int]] = [[] for _ in range(num_experts)]
    for instance, experts in enumerate(hosted):
        for expert in experts:
            holders[expert].append(instance)
    return Placement(
        instances=tuple(tuple(sorted(experts)) for experts in hosted),
        shares=tuple(tuple((i, 1.0 / len(h)) for i in h) for h in holders),
        slots=slots,
    )


def placement_of(hosted: Sequence[Sequence[int]], num_experts: int, slots: int) -> Placement:
    """The Placement of explicit per-instance expert sets (e.g. what live instances report);
    experts hosted nowhere get no replicas (an empty `shares` entry)."""
    return _placement([set(h) for h in hosted], num_experts, slots)


def replica_counts(counts: Sequence[int], num_instances: int, budget: int, slots: int) -> list[int]:
    """Replicas per expert: start at one each, then repeatedly add a replica to the expert with
    the highest per-replica load (count / replicas) while the budget and the total capacity
    (num_instances * slots) allow, never beyond num_instances replicas of one expert, and never
    for an expert whose per-replica load is 0."""
    _check(counts, num_instances, slots, budget)
    replicas = [1] * len(counts)
    capacity = min(len(counts) + budget, num_instances * slots)
    heap = [(-float(c), e) for e, c in enumerate(counts) if num_instances > 1]
    heapq.heapify(heap)
    total = len(counts)
    while total < capacity and heap:
        neg_load, expert = heapq.heappop(heap)
        if neg_load >= 0:
            break
        replicas[expert] += 1
        total += 1
        if replicas[expert] < num_instances:
            heapq.heappush(heap, (-counts[expert] / replicas[expert], expert))
    return replicas


def _feasible(need: Sequence[int], free: Sequence[int]) -> bool:
    """Gale-Ryser: can experts needing need[j] distinct instances fit instances with free[i]
    slots? Iff for every k, the k largest needs sum to at most sum_i min(free[i], k)."""
    top = max(free, default=0)
    at_least = [sum(1 for f in free if f >= t) for t in range(top + 1)]
    fits, total = 0, 0
    for k, r in enumerate(sorted(need, reverse=True), start=1):
        fits += at_least[k] if k <= top else 0
        total += r
        if total > fits:
            return False
    return True


def assign(
    counts: Sequence[int], replicas: Sequence[int], num_instances: int, slots: int
) -> Placement:
    """Place `replicas[e]` copies of each expert: experts by descending per-replica load
    (largest first), each copy on the least-loaded instance with a free slot that does not host
    it yet. When that choice would leave the remaining experts unplaceable (capacity is tight),
    the copies go to the instances with the most free slots instead, which always keeps them
    placeable. Requires 1 <= replicas[e] <= num_instances and sum(replicas) <= N * slots."""
    _check(counts, num_instances, slots)
    if len(replicas) != len(counts) or not all(1 <= r <= num_instances for r in replicas):
        raise ValueError("need one replica count in [1, num_instances] per expert")
    if sum(replicas) > num_instances * slots:
        raise ValueError(f"{sum(replicas)} replicas exceed {num_instances} x {slots} slots")
    order = sorted(range(len(counts)), key=lambda e: (-counts[e] / replicas[e], e))
    loads = [0.0] * num_instances
    hosted: list[set[int]] = [set() for _ in range(num_instances)]
    for position, expert in enumerate(order):
        free = [slots - len(h) for h in hosted]
        open_ = [i for i in range(num_instances) if free[i] > 0]
        chosen = sorted(open_, key=lambda i: (loads[i], i))[: replicas[expert]]
        after = [f - (i in chosen) for i, f in enumerate(free)]
        if not _feasible([replicas[e] for e in order[position + 1 :]], after):
            chosen = sorted(open_, key=lambda i: (-free[i], loads[i], i))[: replicas[expert]]
        assert len(chosen) == replicas[expert], "capacity invariant broken"
        for instance in chosen:
            hosted[instance].add(expert)
            loads[instance] += counts[expert] / replicas[expert]
    return _placement(hosted, len(counts), slots)


def balance(counts: Sequence[int], num_instances: int, budget: int, slots: int) -> Placement:
    """The balanced placement: `replica_counts`, then `assign`."""
    replicas = replica_counts(counts, num_instances, budget, slots)
    return assign(counts, replicas, num_instances, slots)


def round_robin(num_experts: int, num_instances: int, slots: int) -> Placement:
    """The naive baseline: expert e alone on instance e % num_instances, no replicas."""
    _check([0] * num_experts, num_instances, slots)
    if -(-num_experts // num_instances) > slots:
        raise ValueError(f"round robin needs {-(-num_experts // num_instances)} slots")
    hosted = [set(range(i, num_experts, num_instances)) for i in range(num_instances)]
    return _placement(hosted, num_experts, slots)


def instance_loads(placement: Placement, counts: Sequence[int]) -> list[float]:
    """Tokens each instance serves: sum over its experts of count * that replica's share."""
    if len(counts) != placement.num_experts:
        raise ValueError(f"{len(counts)} counts for {placement.num_experts} experts")
    loads = [0.0] * placement.num_instances
    for expert, replicas in enumerate(placement.shares):
        for instance, share in replicas:
            loads[instance] += counts[expert] * share
    return loads


def imbalance_ratio(loads: Sequence[float]) -> float:
    """max / mean of the loads (1.0 is perfect; 1.0 as well when there is no load at all)."""
    if not loads:
        raise ValueError("no loads")
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def _relabel(current: Placement, fresh: Placement) -> list[set[int]]:
    """fresh's instance sets, renumbered onto current's instance ids to keep as many replicas in
    place as possible: the better of identity and a greedy maximum-overlap matching, then
    pairwise swaps while they help (moves = sizes - 2 * overlap, so overlap is what counts)."""
    n = current.num_instances
    new_sets = [set(h) for h in fresh.instances]
    overlap = [[len(new_sets[new] & set(current.instances[old])) for old in range(n)]
               for new in range(n)]
    greedy = [-1] * n  # new instance -> old instance id
    taken: set[int] = set()
    for _, new, old in sorted((-overlap[a][b], a, b) for a in range(n) for b in range(n)):
        if greedy[new] < 0 and old not in taken:
            greedy[new] = old
            taken.add(old)
    best = max(list(range(n)), greedy, key=lambda m: sum(overlap[i][m[i]] for i in range(n)))
    improved = True
    while improved:
        improved = False
        for a in range(n):
            for b in range(a + 1, n):
                gain = overlap[a][best[b]] + overlap[b][best[a]] - overlap[a][best[a]]
                if gain - overlap[b][best[b]] > 0:
                    best[a], best[b] = best[b], best[a]
                    improved = True
    target: list[set[int]] = [set() for _ in range(n)]
    for new, old in enumerate(best):
        target[old] = new_sets[new]
    return target


def _schedule(state: list[set[int]], target: list[set[int]], slots: int) -> list[Move]:
    """Order the adds and removes that turn state into target (state is consumed): adds onto
    instances with a free slot first, removes only of experts that keep another replica. If
    neither exists (a cycle of swaps between full instances), one add goes over capacity,
    preferring one that unblocks a remove, on the emptiest instance."""
    adds = sorted((e, i) for i in range(len(target)) for e in target[i] - state[i])
    removes = sorted((e, i) for i in range(len(target)) for e in state[i] - target[i])
    holders = [0] * (1 + max([e for s in state + target for e in s], default=0))
    for hosted in state:
        for e in hosted:
            holders[e] += 1
    moves: list[Move] = []

    def add(e: int, i: int) -> None:
        adds.remove((e, i))
        state[i].add(e)
        holders[e] += 1
        moves.append(Move("add", e, i))

    while adds or removes:
        progressed = False
        for e, i in list(adds):
            if len(state[i]) < slots:
                add(e, i)
                progressed = True
        for e, i in list(removes):
            if holders[e] > 1:
                removes.remove((e, i))
                state[i].discard(e)
                holders[e] -= 1
                moves.append(Move("remove", e, i))
                progressed = True
        if not progressed:  # a swap cycle: every add hits a full instance, every remove orphans
            blocked = {e for e, _ in removes}
            add(*min(adds, key=lambda m: (m[0] not in blocked, len(state[m[1]]), m)))
    return moves


def plan_rebalance(
    current: Placement, counts: Sequence[int], budget: int
) -> tuple[Placement, list[Move]]:
    """The balanced placement for `counts` on current's instances and slots, and the moves that
    reach it from `current`.

    The new placement is `balance(...)` with its instances renumbered to keep as many replicas
    in place as possible (same loads, fewer moves; re-planning what `balance` placed for the
    same counts and budget gives no moves). Applied in order, the moves keep every expert
    hosted at every step (make before break) and keep every instance within `slots`, except
    that a cycle of swaps between full instances forces an add onto a full instance first
    (transiently slots + 1: the tests check that bound on random cases; it is not proven).
    """
    if len(counts) != current.num_experts:
        raise ValueError(f"{len(counts)} counts for {current.num_experts} experts")
    fresh = balance(counts, current.num_instances, budget, current.slots)
    target = _relabel(current, fresh)
    placement = _placement(target, len(counts), current.slots)
    moves = _schedule([set(h) for h in current.instances], target, current.slots)
    return placement, moves
