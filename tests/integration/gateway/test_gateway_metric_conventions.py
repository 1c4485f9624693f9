"""The gateway's /metrics as Prometheus users read it (real `moeflow up`, real HTTP): no reserved
`instance` label, units in names, latency buckets that reach the request timeout, and token
counters that move while a stream is still open."""

from __future__ import annotations

import math
import re
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.platform_process import Platform

MODEL = "tiny"
REQUEST_TIMEOUT_S = 600.0  # GatewaySettings.request_timeout_s, which the platform keeps


def _families(platform: Platform) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    text = httpx.get(f"{platform.root_url}/metrics", timeout=5).text
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples]
            for f in text_string_to_metric_families(text)}


def test_engine_gauges_are_labelled_engine_not_instance(platform: Platform) -> None:
    families = _families(platform)
    for name, samples in families.items():
        for _, labels, _ in samples:
            assert "instance" not in labels, (name, labels)
    for name in ("moeflow_queue_depth", "moeflow_running_requests",
                 "moeflow_kv_cache_usage_ratio"):
        [(_, labels, _)] = families[name]  # one engine behind this platform
        assert labels["model"] == MODEL and labels["role"] == "colocated"
        assert re.fullmatch(r"127\.0\.0\.1:\d+", labels["engine"]), labels


def test_units_are_in_names_and_latency_buckets_reach_the_timeout(platform: Platform) -> None:
    httpx.post(f"{platform.base_url}/completions", timeout=30,
               json={"model": MODEL, "prompt": "buckets", "max_tokens": 2}).raise_for_status()
    families = _families(platform)
    assert not [n for n in families if re.search(r"_ms(_|$)", n)]
    for name in ("moeflow_e2e_request_latency_seconds", "moeflow_time_to_first_token_seconds"):
        bounds = [float(labels["le"]) for sample, labels, _ in families[name]
                  if sample.endswith("_bucket")]
        finite = [b for b in bounds if not math.isinf(b)]
        assert max(finite) >= REQUEST_TIMEOUT_S, (name, finite)


def test_generated_tokens_are_counted_while_the_stream_runs(platform: Platform) -> None:
    def generated_and_in_flight() -> tuple[float, float]:
        families = _families(platform)
        [(_, _, in_flight)] = families["moeflow_gateway_requests_in_flight"]
        tokens = sum(v for s, labels, v in families["moeflow_generation_tokens"]
                     if s.endswith("_total") and labels["model"] == MODEL)
        return tokens, in_flight

    before, idle = generated_and_in_flight()
    assert idle == 0
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def scrape() -> None:  # a scraper that never stops while the stream runs
        while not done.is_set():
            samples.append(generated_and_in_flight())

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    max_tokens = 200
    body = {"model": MODEL, "prompt": "The river", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0}
    try:
        with httpx.stream("POST", f"{platform.base_url}/completions", json=body,
                          timeout=60) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
    finally:
        done.set()
        scraper.join(timeout=10)
    assert events[-1] == "data: [DONE]"
    # scrapes while the request was held: counting at the end would show none of its tokens
    during = [tokens - before for tokens, in_flight in samples if in_flight == 1]
    assert during, "no scrape landed while the stream ran"
    assert any(0 < n < max_tokens for n in during), during
    assert during == sorted(during)  # a counter: it only moves up
    deadline = time.monotonic() + 5  # the gateway lets the request go just after [DONE]
    while (after := generated_and_in_flight())[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after == (before + max_tokens, 0)
