"""2,000 concurrent streams against one gateway: each completes or gets a clean 429, the
gateway's memory stays bounded, and the platform answers normally right after."""

from __future__ import annotations

import asyncio
import json
import resource
from pathlib import Path

import httpx
import openai

from tests.platform_process import start_platform

NUM_STREAMS = 2000
MAX_IN_FLIGHT = 256


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def one_stream(client: httpx.AsyncClient, url: str, i: int) -> str:
    body = {"model": "tiny", "prompt": f"request {i}", "max_tokens": 4, "stream": True,
            "temperature": 0}
    async with client.stream("POST", url, json=body) as response:
        if response.status_code == 429:
            data = json.loads(await response.aread())
            assert data["error"]["type"] == "rate_limit_error", data
            assert response.headers.get("retry-after"), response.headers
            return "429"
        assert response.status_code == 200, (response.status_code, await response.aread())
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", events[-3:]
        assert not any('"error"' in e for e in events), events
        return "ok"


async def test_two_thousand_concurrent_streams(tiny_dirs: dict[str, Path]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    platform = start_platform(tiny_dirs["llama"], [
        "--served-model-name", "tiny", "--max-model-len", "256",
        "--max-in-flight", str(MAX_IN_FLIGHT)])
    try:
        url = f"{platform.base_url}/completions"
        before_mb = rss_mb(platform.process.pid)
        limits = httpx.Limits(max_connections=NUM_STREAMS, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=180, limits=limits) as client:
            outcomes = await asyncio.wait_for(asyncio.gather(
                *(one_stream(client, url, i) for i in range(NUM_STREAMS))), 300)
        after_mb = rss_mb(platform.process.pid)
        num_ok = outcomes.count("ok")
        assert num_ok + outcomes.count("429") == NUM_STREAMS
        assert num_ok >= MAX_IN_FLIGHT // 2, outcomes.count("429")
        print(f"{NUM_STREAMS} streams: {num_ok} completed, {outcomes.count('429')} x 429; "
              f"gateway RSS {before_mb:.0f} -> {after_mb:.0f} MiB")
        assert after_mb - before_mb < 400, (before_mb, after_mb)
        # right after: normal answers, health ok, counters add up
        c = openai.AsyncOpenAI(base_url=platform.base_url, api_key="x", max_retries=0)
        r = await c.completions.create(model="tiny", prompt="after", max_tokens=3)
        assert r.usage is not None and r.usage.completion_tokens == 3
        await c.close()
        assert httpx.get(f"{platform.root_url}/health", timeout=5).status_code == 200
        assert platform.metric("moeflow_requests_total", status="429") == outcomes.count("429")
        assert platform.process.poll() is None
    finally:
        platform.stop()
