"""Which expert instance serves each (token, expert) pair: the attention side's routing table.

An ``ExpertMap`` is a placement (expert ids hosted per expert instance; the same for every MoE
layer, so one replica of an expert holds all its layers) minus the instances known dead. A
token goes to replica ``token_index % num_replicas`` of its expert: each token meets an expert
at most once, so an expert's tokens split evenly between its replicas, deterministically.
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
        """Split the pairs of expert_ids [T, k] by serving instance.

        Raises ExpertsUnavailableError when a routed expert has no live replica."""
        counts = self._num_replicas[expert_ids]
        if bool((counts == 0).any()):
            missing = sorted({int(e) for e in expert_ids[counts == 0].tolist()})
            raise ExpertsUnavailableError(
                f"experts {missing} have no live expert instance; the balancer re-places them "
                "onto the surviving instances"
            )
        num_tokens = expert_ids.shape[0]
        token_index = torch.arange(num_tokens, dtype=torch.int64)[:, None].expand_as(expert_ids)
        choice = token_index % counts
        instance = self._table[expert_ids, choice]  # [T, k]
        tokens: dict[int, torch.Tensor] = {}
        slots: dict[int, torch.Tensor] = {}
        for j in torch.unique(instance).tolist():
            t, s = torch.nonzero(instance == j, as_tuple=True)
            tokens[j], slots[j] = t, s
        return DispatchPlan(tokens, slots)
