"""The attention instance's extra HTTP surface: expert placement and expert-traffic metrics.

``POST /v1/experts/placement`` (an ``ExpertPlacement``) switches the routing table at the next
MoE layer; the balancer sends it only once every expert it names is loaded where it says
(make before break). ``GET /v1/experts/stats`` is an ``AttentionExpertStats``.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moeflow.domain.errors import InvalidRequestError
from moeflow.domain.messages import AttentionExpertStats, ExpertPlacement
from moeflow.engine.ae.expert_client import ExpertClient


class _ExpertMetrics(Collector):
    def __init__(self, client: ExpertClient, instance: str) -> None:
        self._client = client
        self._instance = instance

    def collect(self) -> Iterator[Metric]:
        s = self._client.stats()
        me = self._instance
        routed = CounterMetricFamily(
            "moeflow_expert_routed_tokens", "Top-k hits per expert, all MoE layers",
            labels=["engine", "expert"])
        for expert, count in enumerate(s.routed_tokens_per_expert):
            routed.add_metric([me, str(expert)], count)
        pairs = CounterMetricFamily(
            "moeflow_expert_instance_pairs", "(token, expert) pairs sent per expert instance",
            labels=["engine", "expert_instance"])
        for index, count in enumerate(s.pairs_per_instance):
            pairs.add_metric([me, f"expert-{index}"], count)
        ratio = GaugeMetricFamily(
            "moeflow_expert_imbalance_ratio",
            "max/mean pairs per live expert instance since the last placement", labels=["engine"])
        ratio.add_metric([me], s.imbalance_ratio)
        version = GaugeMetricFamily("moeflow_expert_placement_version",
                                    "Expert placement version in use", labels=["engine"])
        version.add_metric([me], s.placement.version)
        # a mean since the instance started (the client keeps sums, not samples): a gauge
        latency = GaugeMetricFamily(
            "moeflow_expert_exchange_seconds",
            "Mean A2E/E2A latency and expert compute per MoE layer",
            labels=["engine", "layer", "leg"])
        for layer, a2e, e2a, compute in zip(self._client.moe_layer_ids, s.a2e_ms_per_layer,
                                            s.e2a_ms_per_layer, s.expert_compute_ms_per_layer,
                                            strict=True):
            latency.add_metric([me, str(layer), "a2e"], a2e / 1000)
            latency.add_metric([me, str(layer), "e2a"], e2a / 1000)
            latency.add_metric([me, str(layer), "compute"], compute / 1000)
        redispatched = CounterMetricFamily(
            "moeflow_expert_redispatched_pairs", "Pairs re-sent after an expert instance failed",
            labels=["engine"])
        redispatched.add_metric([me], s.num_redispatches_total)
        yield from (routed, pairs, ratio, version, latency, redispatched)


def add_attention_routes(
    app: FastAPI, client: ExpertClient, registry: CollectorRegistry, instance: str
) -> None:
    registry.register(_ExpertMetrics(client, instance))

    @app.post("/v1/experts/placement")
    async def set_placement(placement: ExpertPlacement) -> AttentionExpertStats:
        try:
            client.set_placement(placement)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="hosted") from exc
        return client.stats()

    @app.get("/v1/experts/stats")
    async def expert_stats() -> AttentionExpertStats:
        return client.stats()
