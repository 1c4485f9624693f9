"""The status page's arithmetic, without a server: cumulative totals read from the gateway's
Prometheus registry, and the windowed series computed from a history of samples."""

from __future__ import annotations

import pytest

from moeflow.gateway.engine_client import EngineClient
from moeflow.gateway.metrics import GatewayMetrics
from moeflow.gateway.registry import ModelRegistry
from moeflow.gateway.status_page import (
    ModelTotals,
    Sample,
    StatusHistory,
    read_totals,
    series,
)


@pytest.fixture
def metrics() -> GatewayMetrics:
    client = EngineClient(connect_timeout_s=1, request_timeout_s=1)
    return GatewayMetrics(ModelRegistry(client))


def test_totals_sum_counters_over_their_other_labels(metrics: GatewayMetrics) -> None:
    metrics.requests.labels("m", "chat", "200").inc(2)
    metrics.requests.labels("m", "completions", "429").inc()
    metrics.generation_tokens.labels("m").inc(40)
    metrics.ttft.labels("m").observe(0.1)
    metrics.ttft.labels("m").observe(0.3)
    metrics.tpot.labels("other").observe(0.02)
    totals = read_totals(metrics.registry)
    assert totals["m"].requests == 3 and totals["m"].generation_tokens == 40
    assert totals["m"].ttft_count == 2 and totals["m"].ttft_sum_s == pytest.approx(0.4)
    assert totals["other"].tpot_count == 1 and totals["other"].requests == 0


def sample(t: float, **totals: ModelTotals) -> Sample:
    return Sample(wall_s=1000 + t, monotonic_s=t, totals=totals)


def test_series_is_per_interval_and_none_where_no_request_finished() -> None:
    samples = [
        sample(0.0),  # before the model's first request: counts as zero
        sample(2.0, m=ModelTotals(requests=2, generation_tokens=20, ttft_sum_s=0.2,
                                  ttft_count=2, tpot_sum_s=0.04, tpot_count=2)),
        sample(3.0, m=ModelTotals(requests=2, generation_tokens=20, ttft_sum_s=0.2,
                                  ttft_count=2, tpot_sum_s=0.04, tpot_count=2)),
    ]
    out = series(samples, ["m", "idle"])
    assert out["t"] == [1002.0, 1003.0]
    m = out["models"]["m"]
    assert m["ttft_ms"] == [100.0, None] and m["tpot_ms"] == [20.0, None]
    assert m["tokens_per_s"] == [10.0, 0.0] and m["requests_per_s"] == [1.0, 0.0]
    assert out["models"]["idle"]["tokens_per_s"] == [0.0, 0.0]


def test_history_keeps_one_sample_per_interval_and_a_bounded_number() -> None:
    history = StatusHistory(max_samples=3, min_interval_s=0.5)
    for t in (0.0, 0.2, 0.6, 1.2, 1.3, 2.0):
        history.record(sample(t))
    assert [s.monotonic_s for s in history.samples] == [0.6, 1.2, 2.0]
