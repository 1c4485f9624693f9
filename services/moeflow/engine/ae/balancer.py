"""Expert load balancer: measure routed tokens, place replicas of hot experts, reconfigure live.

One cycle (``rebalance``): read every attention instance's per-expert routed-token counters
(their growth since the last cycle is the window), read which experts every live expert
instance actually hosts, and let ``eplb.plan_rebalance`` pick the placement that minimises the
largest per-instance load within the replica budget. Apply it make-before-break, without
pausing serving: (1) load the added experts where they go, (2) switch every attention
instance to the new placement (the next MoE layer routes by it), (3) drop what is no longer
placed. Replicas hold identical weights, so outputs do not change.

Healing: an expert instance that does not answer ``/health`` counts as dead; placement is then
computed over the live instances only (the dead one hosts nothing), so orphaned experts are
loaded onto survivors, whatever the gain. An instance that comes back is counted again at the
next cycle, with the experts it reports.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from moeflow.domain.messages import (
    AttentionExpertStats,
    ExpertInstanceStats,
    ExpertLoadRequest,
    ExpertPlacement,
)
from moeflow.domain.roles import Role
from moeflow.engine import eplb
from moeflow.web.internal_auth import internal_headers, token_from_env

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebalanceReport:
    applied: bool
    reason: str
    version: int
    hosted: tuple[tuple[int, ...], ...]
    predicted_imbalance_before: float
    predicted_imbalance_after: float
    num_moves: int


class ExpertBalancer:
    def __init__(
        self,
        attention_urls: Sequence[str],
        expert_urls: Sequence[str],
        num_experts: int,
        *,
        budget: int | None = None,
        min_gain: float = 0.05,
        timeout_s: float = 60.0,
        internal_token: str | None = None,
    ) -> None:
        """`expert_urls[i]` is the instance with XCCL rank expert-i. `budget`: extra replicas
        in total (default: one per expert instance); `min_gain`: the smallest relative drop of
        the predicted imbalance worth a reconfiguration. `internal_token`: sent with every
        call to the instances (default: ``MOEFLOW_INTERNAL_TOKEN`` from the environment, as
        the platform passes it)."""
        if not attention_urls or not expert_urls:
            raise ValueError("the balancer needs attention and expert instances")
        self._attention = list(attention_urls)
        self._experts = list(expert_urls)
        self.num_experts = num_experts
        self.budget = len(expert_urls) if budget is None else budget
        self.min_gain = min_gain
        token = internal_token if internal_token is not None else token_from_env()
        self._http = httpx.Client(timeout=timeout_s, headers=internal_headers(token))
        self._last_counts = [0] * num_experts
        self.version = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def set_fleet(self, attention_urls: Sequence[str], expert_urls: Sequence[str]) -> None:
        """New URLs (pods come back with new addresses). `expert_urls[i]` is rank expert-i; ""
        for an instance with no address right now (it counts as dead)."""
        if len(expert_urls) != len(self._experts):
            raise ValueError(f"{len(expert_urls)} expert URLs for {len(self._experts)} ranks")
        with self._lock:
            self._attention = list(attention_urls)
            self._experts = list(expert_urls)

    # -- observations --------------------------------------------------------------------
    def attention_stats(self) -> list[AttentionExpertStats]:
        out = []
        for url in self._attention:
            response = self._http.get(f"{url}/v1/experts/stats")
            response.raise_for_status()
            out.append(AttentionExpertStats.model_validate_json(response.content))
        return out

    def expert_stats(self) -> list[ExpertInstanceStats | None]:
        """Per expert instance, its stats, or None when it does not answer (dead)."""
        out: list[ExpertInstanceStats | None] = []
        for url in self._experts:
            if not url:
                out.append(None)
                continue
            try:
                response = self._http.get(f"{url}/v1/experts/stats", timeout=5.0)
                response.raise_for_status()
                out.append(ExpertInstanceStats.model_validate_json(response.content))
            except httpx.HTTPError:
                out.append(None)
        return out

    def _window_counts(self, stats: list[AttentionExpertStats]) -> list[int]:
        totals = [sum(s.routed_tokens_per_expert[e] for s in stats)
                  for e in range(self.num_experts)]
        window = [max(0, t - last) for t, last in zip(totals, self._last_counts, strict=True)]
        self._last_counts = totals
        return window

    def reset_window(self) -> None:
        """Start the routed-token window now (the next cycle plans from what follows)."""
        self._window_counts(self.attention_stats())

    # -- one cycle -----------------------------------------------------------------------
    def rebalance(self, *, force: bool = False) -> RebalanceReport:
        with self._lock:
            return self._rebalance(force)

    def _rebalance(self, force: bool) -> RebalanceReport:
        attention = self.attention_stats()
        counts = self._window_counts(attention)
        self.version = max([self.version, *(s.placement.version for s in attention)])
        experts = self.expert_stats()
        alive = [i for i, s in enumerate(experts) if s is not None]
        if not alive:
            return self._report(False, "no expert instance answers", experts, 1.0, 1.0, 0)
        hosted_now = [set(s.hosted) if s is not None else set() for s in experts]
        orphans = set(range(self.num_experts)) - set().union(*hosted_now)
        if sum(counts) == 0:
            counts = [1] * self.num_experts  # no traffic yet: balance the expert count
        slots = max(math.ceil((self.num_experts + self.budget) / len(alive)),
                    max(len(h) for h in hosted_now))
        current = eplb.placement_of([sorted(hosted_now[i]) for i in alive], self.num_experts,
                                    slots)
        budget = min(self.budget, len(alive) * slots - self.num_experts)
        target, moves = eplb.plan_rebalance(current, counts, budget)
        before = eplb.imbalance_ratio(eplb.instance_loads(current, counts)) if not orphans \
            else math.inf
        after = eplb.imbalance_ratio(eplb.instance_loads(target, counts))
        dead = len(alive) < len(self._experts)
        # an attention instance that marked a now-answering instance dead needs a new placement
        stale = any(set(s.dead_instances) & set(alive) for s in attention)
        if not (force or orphans or stale or after < before * (1 - self.min_gain)):
            return self._report(False, "gain below min_gain", experts, before, after, 0)
        new_hosted: list[set[int]] = [set() for _ in self._experts]
        for compact, instance in enumerate(alive):
            new_hosted[instance] = set(target.instances[compact])
        self._apply(hosted_now, new_hosted, alive)
        reason = ("re-placed the experts of dead instances" if orphans or dead
                  else "refreshed stale dead marks" if stale else "rebalanced")
        logger.info("expert placement v%d (%s): imbalance %.2f -> %.2f predicted, %d moves",
                    self.version, reason, before, after, len(moves))
        return RebalanceReport(True, reason, self.version,
                               tuple(tuple(sorted(h)) for h in new_hosted), before, after,
                               len(moves))

    def _apply(self, now: list[set[int]], new: list[set[int]], alive: list[int]) -> None:
        for i in alive:  # 1. make
            if new[i] - now[i]:
                self._post(self._experts[i], "/v1/experts/load",
                           ExpertLoadRequest(experts=tuple(sorted(new[i] - now[i]))))
        self.version += 1  # 2. switch
        placement = ExpertPlacement(version=self.version,
                                    hosted=tuple(tuple(sorted(h)) for h in new))
        for url in self._attention:
            self._post(url, "/v1/experts/placement", placement)
        for i in alive:  # 3. break
            if now[i] - new[i]:
                self._post(self._experts[i], "/v1/experts/unload",
                           ExpertLoadRequest(experts=tuple(sorted(now[i] - new[i]))))

    def _post(self, url: str, path: str, body: ExpertLoadRequest | ExpertPlacement) -> None:
        response = self._http.post(f"{url}{path}", content=body.model_dump_json(),
                                   headers={"content-type": "application/json"})
        response.raise_for_status()

    def _report(self, applied: bool, reason: str, experts: list[ExpertInstanceStats | None],
                before: float, after: float, num_moves: int) -> RebalanceReport:
        hosted = tuple(tuple(s.hosted) if s is not None else () for s in experts)
        return RebalanceReport(applied, reason, self.version, hosted, before, after, num_moves)

    def run(self, interval_s: float, stop: threading.Event,
            refresh: Callable[[], tuple[list[str], list[str]]] | None = None) -> None:
        """Rebalance every `interval_s` until `stop` is set; errors are logged, not fatal.
        `refresh` (e.g. from Kubernetes Tasks) gives the current URLs before each cycle."""
        while not stop.wait(interval_s):
            try:
                if refresh is not None:
                    self.set_fleet(*refresh())
                if self._attention:
                    self.rebalance()
            except (httpx.HTTPError, ValueError, OSError) as exc:
                logger.warning("expert rebalance skipped: %s", exc)


def fleet_urls(instances: Sequence[tuple[str, int, str]], num_experts: int
               ) -> tuple[list[str], list[str]]:
    """(role, rank, url) of a Model's instances -> attention URLs, and expert URLs by rank
    ("" where a rank has no instance)."""
    attention = [url for role, _, url in sorted(instances) if role == Role.ATTENTION]
    experts = [""] * num_experts
    for role, rank, url in instances:
        if role == Role.EXPERT and 0 <= rank < num_experts:
            experts[rank] = url
    return attention, experts
