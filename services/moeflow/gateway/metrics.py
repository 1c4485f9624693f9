"""Prometheus metrics of the gateway, in a registry owned by one app (no globals).

Latency definitions follow vLLM's benchmark: TTFT is request arrival to the first generated
token; TPOT is (end-to-end - TTFT) / (output tokens - 1) per request; ITL is the gap between
consecutive streamed chunks.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moeflow.gateway.registry import ModelRegistry

_LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)


class RecentLatencies:
    """The last `max_samples` TTFT and TPOT observations with their time, for an autoscaler
    that judges the SLO on what happened lately (histograms only hold totals)."""

    def __init__(self, max_samples: int = 1024) -> None:
        self._ttft: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._tpot: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def record_ttft(self, seconds: float) -> None:
        self._ttft.append((time.monotonic(), seconds * 1000))

    def record_tpot(self, seconds: float) -> None:
        self._tpot.append((time.monotonic(), seconds * 1000))

    def window(self, window_s: float) -> tuple[list[float], list[float]]:
        """(TTFT ms, TPOT ms) observed in the last `window_s` seconds."""
        since = time.monotonic() - window_s
        return ([ms for at, ms in list(self._ttft) if at >= since],
                [ms for at, ms in list(self._tpot) if at >= since])


class GatewayMetrics:
    def __init__(self, registry_of_models: ModelRegistry) -> None:
        self.recent = RecentLatencies()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moeflow_requests",
            "Answers to /v1 requests by final status, each counted once by RequestCountMiddleware "
            "(model is empty until the request named a served model; 499: the client left)",
            ["model", "endpoint", "status"], registry=r,
        )
        self.ttft = Histogram(
            "moeflow_time_to_first_token_seconds", "Time to first token", ["model"],
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.tpot = Histogram(
            "moeflow_time_per_output_token_seconds", "Mean time per output token after the first",
            ["model"], buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.itl = Histogram(
            "moeflow_inter_token_latency_seconds", "Gap between streamed chunks", ["model"],
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.e2e = Histogram(
            "moeflow_e2e_request_latency_seconds", "Request latency end to end", ["model"],
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.prompt_tokens = Counter(
            "moeflow_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "moeflow_generation_tokens", "Tokens generated", ["model"], registry=r
        )
        self.cached_prompt_tokens = Counter(
            "moeflow_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
            ["model"], registry=r,
        )
        self.requests_by_mode = Counter(
            "moeflow_requests_by_mode", "Finished requests by placement (colocated or split)",
            ["model", "mode"], registry=r,
        )
        self.kv_transfer_bytes = Histogram(
            "moeflow_kv_transfer_bytes", "Prompt KV bytes moved prefill -> decode per request",
            ["model"], buckets=tuple(2.0**k for k in range(10, 33, 2)), registry=r,
        )
        self.kv_transfer_seconds = Histogram(
            "moeflow_kv_transfer_seconds", "KV transfer time (prefill send + decode receive)",
            ["model"], buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.kv_transfer_ttft_share = Histogram(
            "moeflow_kv_transfer_ttft_share", "Share of TTFT spent getting the prompt's KV",
            ["model"], buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )
        self.failovers = Counter(
            "moeflow_failovers_total",
            "Requests moved to another instance after theirs failed (reason: unreachable, cut, "
            "error, or the engine's error code)",
            ["model", "reason"], registry=self.registry,
        )
        self.in_flight = Gauge(
            "moeflow_gateway_requests_in_flight", "Requests the gateway holds now", registry=r
        )
        self.waiting_for_scale_up = Gauge(
            "moeflow_gateway_requests_waiting_for_scale_up",
            "Requests held while their model scales up from zero", ["model"], registry=r,
        )
        self._models = registry_of_models
        labels = ["model", "instance", "role"]
        self._queue_depth = Gauge(
            "moeflow_queue_depth", "Requests waiting in an instance's queue", labels, registry=r
        )
        self._running = Gauge(
            "moeflow_running_requests", "Requests running in an instance", labels, registry=r
        )
        self._kv_usage = Gauge(
            "moeflow_kv_cache_usage_ratio", "Share of an instance's KV blocks in use", labels,
            registry=r,
        )

    def refresh_instance_gauges(self) -> None:
        for model in self._models.models.values():
            for url, stats in model.stats.items():
                self._queue_depth.labels(model.name, url, stats.role).set(stats.num_waiting)
                self._running.labels(model.name, url, stats.role).set(stats.num_running)
                self._kv_usage.labels(model.name, url, stats.role).set(stats.kv_usage_ratio)
