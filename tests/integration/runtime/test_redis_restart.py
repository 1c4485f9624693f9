"""The private redis-server of `moeflow up --mode pd --transport redis` is supervised.

Killed with SIGKILL, it comes back on the same port (empty: no persistence); the engines are
not restarted, their XCCL endpoints reconnect and register again, and new requests through
the prefill/decode split give the same greedy tokens as before the kill.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.platform_process import ALWAYS_SPLIT, Platform, start_platform

MODEL = "tiny"
PROMPTS = [f"Once upon a time there was a small town by a river, story {i}:" for i in range(4)]


def redis_server(platform: Platform) -> tuple[int, int] | None:
    """(pid, port) of the platform's live redis-server, if one runs: its argv until it sets
    its title, "redis-server 127.0.0.1:PORT" after."""
    out = subprocess.run(["pgrep", "-P", str(platform.process.pid), "redis-server"],
                         capture_output=True, text=True, check=False).stdout.split()
    for pid in map(int, out):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()
        except OSError:
            continue
        words = [w.decode() for w in argv]
        if "--port" in words:
            return pid, int(words[words.index("--port") + 1])
        if len(words) > 1 and ":" in words[1]:
            return pid, int(words[1].rsplit(":", 1)[1])
    return None  # none, or only a zombie not reaped yet


def engine_pids(platform: Platform) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(platform.process.pid), "-f", "moeflow.cli"],
                         capture_output=True, text=True, check=False).stdout
    return {int(pid) for pid in out.split()}


async def _greedy(platform: Platform) -> list[str]:
    client = openai.AsyncOpenAI(base_url=platform.base_url, api_key="x", max_retries=0,
                                timeout=60)
    try:
        results = await asyncio.gather(*(
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
            for prompt in PROMPTS))
    finally:
        await client.close()
    return [r.choices[0].text for r in results]


@pytest.fixture(scope="module")
def pd_redis(tiny_dirs: dict[str, Path]) -> Iterator[Platform]:
    p = start_platform(tiny_dirs["llama"], [
        "--served-model-name", MODEL, "--mode", "pd", "--prefill", "1", "--decode", "1",
        *ALWAYS_SPLIT,
        "--transport", "redis", "--max-model-len", "1024"])
    yield p
    assert p.stop() == 0, p.log()[-3000:]


def test_a_killed_redis_comes_back_on_its_port_and_the_split_serves_again(
    pd_redis: Platform,
) -> None:
    p = pd_redis
    undisturbed = asyncio.run(_greedy(p))
    assert all(undisturbed)
    found = redis_server(p)
    assert found is not None
    pid, port = found
    engines = engine_pids(p)
    assert p.metric("moeflow_local_redis_restarts_total") == 0.0

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (now := redis_server(p)) is None or now[0] == pid:
        assert time.monotonic() < deadline, p.log()[-3000:]
        time.sleep(0.1)
    assert now[1] == port  # same port: the engines' URL still holds
    assert p.metric("moeflow_local_redis_restarts_total") == 1.0
    assert "redis-server exited with code -9; restarting it in 0.5 s" in p.log()

    assert asyncio.run(_greedy(p)) == undisturbed  # the very next requests, nothing waited
    assert engine_pids(p) == engines  # the engines kept running: they reconnected
    assert "registered again" in p.log()  # each endpoint re-created its alive-key
