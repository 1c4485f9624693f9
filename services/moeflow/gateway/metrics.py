"""Prometheus metrics of the gateway, in a registry owned by one app (no globals).

Latency definitions follow vLLM's benchmark: TTFT is request arrival to the first generated
token; TPOT is (end-to-end - TTFT) / (output tokens - 1) per request; ITL is the gap between
consecutive streamed chunks.

Names follow Prometheus conventions (units in names, ``_ratio``, ``_total``). Per-engine gauges
re-exported here are labelled ``engine`` (the engine's ``host:port``), never ``instance``:
Prometheus sets ``instance`` to the scraped target (this gateway) and would rename ours to
``exported_instance``; an engine's ``host:port`` is also the ``instance`` its own Pod's scrape
gets, so the two series join on it. Token counters advance with each streamed chunk, not once a
request ends, so tokens/s is smooth while long streams run.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moeflow.domain.messages import TokenChunk
from moeflow.gateway.registry import ModelRegistry

_LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)
_LONG_BUCKETS_S = (
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0,
    600.0,
)


def request_buckets_s(request_timeout_s: float) -> tuple[float, ...]:
    """Buckets for whole-request times (end to end, time to first token): the fixed ones up to
    the gateway's request timeout, then the timeout itself, so that every request the settings
    let run lands in a finite bucket (a request cut at the timeout is seen there too)."""
    below = tuple(b for b in _LONG_BUCKETS_S if b < request_timeout_s)
    return (*below, float(request_timeout_s))


def engine_label(url: str) -> str:
    """The ``engine`` label of an engine URL: its ``host:port``."""
    return urlsplit(url).netloc or url


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
    def __init__(self, registry_of_models: ModelRegistry, request_timeout_s: float = 600.0
                 ) -> None:
        self.recent = RecentLatencies()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moeflow_requests",
            "Answers to /v1 requests by final status, each counted once by RequestCountMiddleware "
            "(model is empty until the request named a served model; 499: the client left)",
            ["model", "endpoint", "status"], registry=r,
        )
        long_buckets = request_buckets_s(request_timeout_s)
        self.ttft = Histogram(
            "moeflow_time_to_first_token_seconds", "Time to first token", ["model"],
            buckets=long_buckets, registry=r,
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
            buckets=long_buckets, registry=r,
        )
        self.prompt_tokens = Counter(
            "moeflow_prompt_tokens", "Prompt tokens processed, counted at the first token",
            ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "moeflow_generation_tokens", "Tokens generated, counted as each chunk streams",
            ["model"], registry=r
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
        self.kv_transfer_ttft_ratio = Histogram(
            "moeflow_kv_transfer_ttft_ratio", "Share of TTFT spent getting the prompt's KV",
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
        labels = ["model", "engine", "role"]
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
        # rebuilt at each scrape: an engine that left must not stay charted at its last value
        gauges = (self._queue_depth, self._running, self._kv_usage)
        for gauge in gauges:
            gauge.clear()
        for model in self._models.models.values():
            for url, stats in model.stats.items():
                labels = (model.name, engine_label(url), stats.role)
                self._queue_depth.labels(*labels).set(stats.num_waiting)
                self._running.labels(*labels).set(stats.num_running)
                self._kv_usage.labels(*labels).set(stats.kv_usage_ratio)


@dataclass
class RequestMeter:
    """What one request already added to the gateway's metrics: prompt tokens at its first
    chunk, generated tokens as each chunk streams (``num_output_tokens`` is cumulative, and
    counts the resumed part after a failover), so tokens/s moves while streams run; end to end
    and TPOT once, when it finishes or breaks."""

    num_output: int = 0
    has_prompt: bool = False
    has_ended: bool = False

    def observe(self, m: GatewayMetrics, name: str, chunk: TokenChunk) -> None:
        if not self.has_prompt:
            self.has_prompt = True
            m.prompt_tokens.labels(name).inc(chunk.num_prompt_tokens)
            m.cached_prompt_tokens.labels(name).inc(chunk.num_cached_tokens)
        if chunk.num_output_tokens > self.num_output:
            m.generation_tokens.labels(name).inc(chunk.num_output_tokens - self.num_output)
            self.num_output = chunk.num_output_tokens

    def observe_end(self, m: GatewayMetrics, name: str, started_s: float,
                    first_s: float | None, last_s: float, last: TokenChunk) -> None:
        """End to end and TPOT, once per request (at its finishing chunk, or where it broke)."""
        if self.has_ended:
            return
        self.has_ended = True
        m.e2e.labels(name).observe(last_s - started_s)
        if first_s is not None and last.num_output_tokens > 1:
            tpot_s = (last_s - first_s) / (last.num_output_tokens - 1)
            m.tpot.labels(name).observe(tpot_s)
            m.recent.record_tpot(tpot_s)
