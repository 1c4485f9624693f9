"""A Model's engine arguments given to a real `moeflow up` take effect in its engine: the
engine's own /metrics (read as the endpoint picker reads it) shows the block size, and no more
requests run at once than `--max-num-seqs` allows, however many arrive."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.platform_process import free_port, start_platform

MAX_NUM_SEQS = 2
NUM_REQUESTS = 5
MAX_TOKENS = 48


def _engine_gauges(text: str) -> dict[str, tuple[dict[str, str], float]]:
    return {s.name: (s.labels, s.value) for f in text_string_to_metric_families(text)
            for s in f.samples if s.name.startswith("vllm:")}


async def test_max_num_seqs_and_block_size_reach_the_engine(tiny_dirs: dict[str, Path]) -> None:
    engine_port = free_port()
    platform = start_platform(tiny_dirs["llama"], [
        "--served-model-name", "tiny", "--engine-port", str(engine_port),
        "--max-num-seqs", str(MAX_NUM_SEQS), "--block-size", "32", "--kv-cache-memory", "48Mi",
    ])
    engine_metrics = f"http://127.0.0.1:{engine_port}/metrics"
    try:
        async with httpx.AsyncClient(timeout=120) as http:
            gauges = _engine_gauges((await http.get(engine_metrics)).text)
            labels, _ = gauges["vllm:cache_config_info"]
            assert labels["block_size"] == "32"

            async def one(i: int) -> int:
                body = {"model": "tiny", "prompt": f"request {i}", "max_tokens": MAX_TOKENS,
                        "ignore_eos": True, "temperature": 0}
                r = await http.post(f"{platform.base_url}/completions", json=body)
                assert r.status_code == 200, r.text
                return int(r.json()["usage"]["completion_tokens"])

            requests = asyncio.gather(*(one(i) for i in range(NUM_REQUESTS)))
            running: list[float] = []
            while not requests.done():
                gauges = _engine_gauges((await http.get(engine_metrics)).text)
                running.append(gauges["vllm:num_requests_running"][1])
                await asyncio.sleep(0.02)
            assert await requests == [MAX_TOKENS] * NUM_REQUESTS
    finally:
        assert platform.stop() == 0, platform.log()[-3000:]
    # the engine ran at its limit and never past it (the default, 64, would run all five)
    assert max(running) == MAX_NUM_SEQS, running
