"""Which expert instance serves each (token, expert) pair: the attention side's routing table.

An ``ExpertMap`` is a placement (expert ids hosted per expert instance; the same for every MoE
layer, so one replica of an expert holds all its layers) minus the instances known dead. An
expert's pairs take its replicas in turn (``replica_choice``), continuing across calls where
the last call stopped: over any run of calls each replica gets its exact share (within one
pair), which is what the planner (``eplb``, shares 1/r) predicts. The earlier rule,
``pair_index % replicas``, sent every top-1 pair to replica 0 and every top-2 pair to
replica 1 when k = r = 2 (a measured 1.08 imbalance where the planner predicted 1.01).
Replicas hold identical weights, so the choice never changes outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeflow.domain.errors import ExpertsUnavailableError


def round_robin_hosted(num_experts: int, num_instances: int) -> list[list[int]]:
    """The initial placement: expert e on instance e % num_instances."""
    if num_experts < 1 or num_instances < 1:
        raise ValueError("need at least one expert and one expert instance")
    return [list(range(i, num_experts, num_instances)) for i in range(num_instances)]


def replica_choice(
    experts: torch.Tensor, num_replicas: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which replica serves each pair, and the offsets for the next call.

    experts [p] (each pair's expert, in pair order), num_replicas [E] (>= 1 where routed),
    offsets [E] (the replica each expert's next pair takes). Expert e's pairs, in order, take
    replicas offsets[e], offsets[e] + 1, ... (mod num_replicas[e]); the returned offsets
    continue from there, so consecutive calls together split each expert exactly evenly."""
    num_experts = num_replicas.shape[0]
    counts = torch.bincount(experts, minlength=num_experts)
    order = torch.argsort(experts, stable=True)
    starts = torch.cumsum(counts, 0) - counts  # first position of each expert in `order`
    rank = torch.empty_like(experts)
    rank[order] = torch.arange(experts.shape[0], dtype=experts.dtype) - starts[experts[order]]
    r = num_replicas.clamp(min=1)
    choice = (rank + offsets[experts]) % r[experts]
    return choice, (offsets + counts) % r


@dataclass(frozen=True)
class DispatchPlan:
    """The pairs (token t, top-k slot s) each instance serves, by instance index."""

    tokens: dict[int, torch.Tensor]  # instance -> [p] int64 token index
    slots: dict[int, torch.Tensor]  # instance -> [p] int64 top-k slot


class ExpertMap:
    def __init__(
        self, hosted: Sequence[Sequence[int]], num_experts: int, *, version: int = 0,
        dead: frozenset[int] = frozenset(),
    ) -> None:
        if any(e < 0 or e >= num_experts for h in hosted for e in h):
            raise ValueError(f"placement names an expert outside [0, {num_experts})")
        self.hosted = tuple(tuple(sorted(set(h))) for h in hosted)
        self.num_experts = num_experts
        self.version = version
        self.dead = dead
        replicas: list[list[int]] = [[] for _ in range(num_experts)]
        for instance, experts in enumerate(self.hosted):
            if instance not in dead:
                for e in experts:
                    replicas[e].append(instance)
        self.replicas = tuple(tuple(r) for r in replicas)
        width = max(1, max(len(r) for r in replicas))
        self._table = torch.zeros(num_experts, width, dtype=torch.int64)
        self._num_replicas = torch.tensor([len(r) for r in replicas], dtype=torch.int64)
        # where each expert's next pair goes (the compute thread's state; a new map restarts)
        self._offsets = torch.zeros(num_experts, dtype=torch.int64)
        for e, r in enumerate(replicas):
            self._table[e, : len(r)] = torch.tensor(r, dtype=torch.int64)

    @property
    def num_instances(self) -> int:
        return len(self.hosted)

    @property
    def orphans(self) -> list[int]:
        """Experts with no live replica."""
        return [e for e, r in enumerate(self.replicas) if not r]

    def without(self, instance: int) -> ExpertMap:
        """This map with `instance` marked dead (same version)."""
        return ExpertMap(self.hosted, self.num_experts, version=self.version,
                         dead=self.dead | {instance})

    def plan(self, expert_ids: torch.Tensor) -> DispatchPlan:
        """Split the pairs of expert_ids [T, k] (row-major pair order) by serving instance,
        each expert's pairs over its replicas in turn (``replica_choice``; advances the map's
        offsets, so call it from one thread).

        Raises ExpertsUnavailableError when a routed expert has no live replica."""
        counts = self._num_replicas[expert_ids]
        if bool((counts == 0).any()):
            missing = sorted({int(e) for e in expert_ids[counts == 0].tolist()})
            raise ExpertsUnavailableError(
                f"experts {missing} have no live expert instance; the balancer re-places them "
                "onto the surviving instances"
            )
        choice, self._offsets = replica_choice(expert_ids.flatten(), self._num_replicas,
                                               self._offsets)
        instance = self._table[expert_ids, choice.view_as(expert_ids)]  # [T, k]
        tokens: dict[int, torch.Tensor] = {}
        slots: dict[int, torch.Tensor] = {}
        for j in torch.unique(instance).tolist():
            t, s = torch.nonzero(instance == j, as_tuple=True)
            tokens[j], slots[j] = t, s
        return DispatchPlan(tokens, slots)
