"""An engine's /metrics as the Gateway API Inference Extension's endpoint picker reads it, and
its torch thread count in a CPU-limited container.

A real engine (tiny llama) behind its real app over real HTTP (uvicorn on a thread). The
picker scrapes the Prometheus text format and picks vLLM's gauges by name and `model_name`;
`prometheus_client`'s parser reads the same format. Steps are slowed down (a sleep around the
real step) so that load is visible at a scrape while requests run, deterministically.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from moeflow.engine.config import EngineSettings, cpu_limit_threads
from moeflow.engine.llm_engine import LLMEngine
from tests.integration.engine.engine_kit import body, serve, wait_until
from tests.reference import make_engine

MODEL = "tiny-served"
PROMPT = (1, 17, 33, 250, 99, 7)
MAX_TOKENS = 40


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, as a scraper sees them."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": MODEL, **labels}.items())))
    assert key in samples, f"{name}{labels} not exported; have {sorted(n for n, _ in samples)}"
    return samples[key]


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_picker_gauges_follow_load_and_tokens_count_as_they_stream(
        tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(tiny_dirs["llama"], served_model_name=MODEL, max_num_seqs=1)
    real_step = engine.step

    def slow_step() -> Any:
        time.sleep(0.03)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)
    with serve(engine) as served:
        idle = scrape(served.url)
        for name in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                     "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            assert value(idle, name) == 0.0, name
        assert any(name == "process_resident_memory_bytes" for name, _ in idle)
        assert value(idle, "vllm:cache_config_info", block_size="16",
                     num_gpu_blocks=str(engine.block_manager.num_blocks)) == 1.0

        async def three_requests() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                async def one(i: int) -> None:
                    request = body(f"r{i}", PROMPT, max_tokens=MAX_TOKENS, temperature=0.0,
                                   ignore_eos=True)
                    response = await client.post(f"{served.url}/v1/generate", json=request)
                    assert response.status_code == 200

                await asyncio.gather(*(one(i) for i in range(3)))

        busy: list[dict[Any, float]] = []

        def loaded() -> bool:
            samples = scrape(served.url)
            generated = value(samples, "vllm:generation_tokens_total")
            if (value(samples, "vllm:num_requests_running") == 1.0
                    and value(samples, "vllm:num_requests_waiting") == 2.0
                    and 0 < generated < MAX_TOKENS):
                busy.append(samples)
            return bool(busy)

        runner = asyncio.new_event_loop()
        try:
            task = runner.run_in_executor(None, lambda: asyncio.run(three_requests()))
            wait_until(loaded, timeout_s=20, what="one running, two waiting, tokens counted")
            runner.run_until_complete(task)
        finally:
            runner.close()
        samples = busy[0]
        assert value(samples, "vllm:kv_cache_usage_perc") > 0.0
        assert value(samples, "vllm:kv_cache_usage_perc") == value(
            samples, "vllm:gpu_cache_usage_perc")
        # per token, not per request: the running request's tokens are counted already
        assert value(samples, "moeflow_engine_generation_tokens_total", role="colocated") > 0

        done = scrape(served.url)
        assert value(done, "vllm:num_requests_running") == 0.0
        assert value(done, "vllm:num_requests_waiting") == 0.0
        assert value(done, "vllm:generation_tokens_total") == 3 * MAX_TOKENS
        assert value(done, "vllm:prompt_tokens_total") == 3 * len(PROMPT)
        assert value(done, "vllm:request_success_total", finished_reason="length") == 3.0
        assert value(done, "vllm:e2e_request_latency_seconds_count") == 3.0
        assert value(done, "vllm:e2e_request_latency_seconds_bucket", le="600.0") == 3.0
        assert value(done, "moeflow_engine_time_to_first_token_seconds_count",
                     role="colocated") == 3.0


def test_cpu_limit_threads_reads_cgroup_v2_and_v1(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("100000 100000\n")
    assert cpu_limit_threads(v2, available=16) == 1
    (v2 / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs: 3 threads
    assert cpu_limit_threads(v2, available=16) == 3
    assert cpu_limit_threads(v2, available=2) == 2  # never more than the CPUs we may use
    (v2 / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert cpu_limit_threads(v2, available=16) == 1
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_limit_threads(v2, available=16) == 16
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_limit_threads(v1, available=16) == 4
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_limit_threads(v1, available=16) == 16
    assert cpu_limit_threads(tmp_path / "absent", available=7) == 7
    assert cpu_limit_threads(tmp_path / "absent") == len(os.sched_getaffinity(0))


def test_engine_in_a_one_cpu_container_runs_one_thread(
        tiny_dirs: dict[str, Path], tmp_path: Path, restore_threads: None) -> None:
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    torch.set_num_threads(max(2, len(os.sched_getaffinity(0))))
    settings = EngineSettings(model_path=tiny_dirs["llama"], cgroup_root=tmp_path,
                              kv_cache_bytes=8 << 20, max_model_len=128, warmup=False)
    assert settings.num_threads == 0  # no explicit count: the limit decides
    engine = LLMEngine(settings)
    try:
        assert torch.get_num_threads() == 1
    finally:
        engine.close()
    explicit = settings.model_copy(update={"num_threads": 2})
    assert explicit.resolved_num_threads() == 2
