"""Model-server metrics of one engine instance: vLLM's names beside MoEFlow's own.

The Gateway API Inference Extension's endpoint picker (llm-d, KServe, kgateway, Istio) and
vLLM's Grafana dashboards read a model server's `/metrics` by vLLM's names. An engine exports
these (every one labelled `model_name`, the served model name, as vLLM does):

| vLLM name | type | meaning |
|---|---|---|
| `vllm:num_requests_waiting` | gauge | requests queued (the picker's queue depth) |
| `vllm:num_requests_running` | gauge | requests in the running batch |
| `vllm:kv_cache_usage_perc` | gauge | share of KV blocks in use, 0..1 (vLLM >= 0.10 name) |
| `vllm:gpu_cache_usage_perc` | gauge | the same value under vLLM's older name (older pickers) |
| `vllm:prompt_tokens_total` | counter | prompt tokens admitted |
| `vllm:generation_tokens_total` | counter | tokens generated, advanced per token as it streams |
| `vllm:request_success_total` | counter | requests finished, by `finished_reason` |
| `vllm:time_to_first_token_seconds` | histogram | arrival to first token |
| `vllm:e2e_request_latency_seconds` | histogram | arrival to last token |
| `vllm:cache_config_info` | gauge (info) | `block_size`, `num_gpu_blocks` labels |
| `vllm:lora_requests_info` | gauge (info) | no adapters: empty label values, as vLLM without LoRA |

MoEFlow's own names follow Prometheus conventions (units in names, `_ratio`, `_total`):
`moeflow_engine_prompt_tokens_total`, `moeflow_engine_generation_tokens_total`,
`moeflow_engine_time_to_first_token_seconds`, `moeflow_engine_e2e_request_duration_seconds`
(labels `role`, `model_name`); `process_*` comes from prometheus_client's ProcessCollector.
Latency buckets reach past the gateway's `request_timeout_s` (600 s), so no request that the
platform lets run lands in +Inf only.

`RequestMeter` is fed by the engine's HTTP layer with each `TokenChunk` as it is streamed, so the
token counters move while a long request runs, not once it ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moeflow.domain.messages import EngineStats, TokenChunk

VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"
VLLM_KV_USAGE_LEGACY = "vllm:gpu_cache_usage_perc"
MODEL_NAME_LABEL = "model_name"

# Seconds. TTFT: a queued prompt on a busy CPU instance can take minutes; e2e: up to the
# gateway's 600 s request timeout and beyond (a request that ran out its time is still seen).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                160.0, 320.0, 640.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0,
               600.0, 960.0, 1920.0)


class _ServerStateCollector(Collector):
    """The gauges the endpoint picker scrapes, read from `EngineStats` at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str, block_size: int
                 ) -> None:
        self._stats = stats
        self._model_name = model_name
        self._block_size = block_size

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        labels = [MODEL_NAME_LABEL]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric([self._model_name], value)
            return family

        yield gauge(VLLM_WAITING, "Number of requests waiting to be processed.",
                    float(stats.num_waiting))
        yield gauge(VLLM_RUNNING, "Number of requests in model execution batches.",
                    float(stats.num_running))
        yield gauge(VLLM_KV_USAGE, "KV-cache usage. 1 means 100 percent usage.",
                    stats.kv_usage_ratio)
        yield gauge(VLLM_KV_USAGE_LEGACY, "KV-cache usage. 1 means 100 percent usage"
                    " (vLLM's name before kv_cache_usage_perc).", stats.kv_usage_ratio)
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache.",
                                 labels=[MODEL_NAME_LABEL, "block_size", "num_gpu_blocks"])
        info.add_metric([self._model_name, str(self._block_size),
                         str(stats.num_total_blocks)], 1.0)
        yield info
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info", "Running stats on LoRA requests (none are served).",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        lora.add_metric(["0", "", ""], float(int(time.time())))
        yield lora


class RequestMeter:
    """Per-request counters and latencies, vLLM's and MoEFlow's, fed chunk by chunk."""

    def __init__(self, registry: CollectorRegistry, *, model_name: str, role: str) -> None:
        ours = {"role": role, MODEL_NAME_LABEL: model_name}
        theirs = {MODEL_NAME_LABEL: model_name}

        def counter(name: str, doc: str, labels: dict[str, str]) -> Counter:
            return Counter(name, doc, list(labels), registry=registry)

        self._prompt = [
            counter("vllm:prompt_tokens", "Number of prefill tokens processed.", theirs)
            .labels(**theirs),
            counter("moeflow_engine_prompt_tokens", "Prompt tokens admitted", ours)
            .labels(**ours)]
        self._generated = [
            counter("vllm:generation_tokens", "Number of generation tokens processed.", theirs)
            .labels(**theirs),
            counter("moeflow_engine_generation_tokens",
                    "Tokens generated, counted as each is streamed", ours).labels(**ours)]
        self._success = Counter("vllm:request_success", "Count of successfully processed"
                                " requests.", [MODEL_NAME_LABEL, "finished_reason"],
                                registry=registry)
        self._model_name = model_name
        self._ttft = [
            Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token"
                      " in seconds.", list(theirs), buckets=TTFT_BUCKETS,
                      registry=registry).labels(**theirs),
            Histogram("moeflow_engine_time_to_first_token_seconds", "Arrival at the engine to"
                      " its first token", list(ours), buckets=TTFT_BUCKETS,
                      registry=registry).labels(**ours)]
        self._e2e = [
            Histogram("vllm:e2e_request_latency_seconds", "Histogram of end to end request"
                      " latency in seconds.", list(theirs), buckets=E2E_BUCKETS,
                      registry=registry).labels(**theirs),
            Histogram("moeflow_engine_e2e_request_duration_seconds", "Arrival at the engine to"
                      " its last token", list(ours), buckets=E2E_BUCKETS,
                      registry=registry).labels(**ours)]

    def start(self, now: float | None = None) -> RequestTimer:
        """One request arrived; feed its chunks to the returned timer."""
        return RequestTimer(self, time.monotonic() if now is None else now)


class RequestTimer:
    """The chunks of one request: counts each generated token as it passes."""

    def __init__(self, meter: RequestMeter, started: float) -> None:
        self._meter = meter
        self._started = started
        self._first_seen = False

    def chunk(self, chunk: TokenChunk, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        meter = self._meter
        if not self._first_seen:
            self._first_seen = True
            for prompt in meter._prompt:
                prompt.inc(chunk.num_prompt_tokens)
            for ttft in meter._ttft:
                ttft.observe(now - self._started)
        for generated in meter._generated:
            generated.inc(len(chunk.token_ids))
        if chunk.finish_reason is not None:
            meter._success.labels(meter._model_name, str(chunk.finish_reason)).inc()
            for e2e in meter._e2e:
                e2e.observe(now - self._started)


def add_model_server_metrics(registry: CollectorRegistry, stats: Callable[[], EngineStats], *,
                             model_name: str, role: str, block_size: int) -> RequestMeter:
    """Register vLLM's model-server metrics, the per-request meter and process_* on
    `registry`; returns the meter the HTTP layer feeds."""
    registry.register(_ServerStateCollector(stats, model_name, block_size))
    ProcessCollector(registry=registry)
    return RequestMeter(registry, model_name=model_name, role=role)
