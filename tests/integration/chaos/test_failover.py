"""Chaos: kill -9 an engine instance while streams are in flight; nothing is lost.

Every in-flight request continues on a surviving instance with the tokens already streamed
(the gateway's failover), so each client receives exactly the text of an undisturbed run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import httpx
import openai

from tests.platform_process import ALWAYS_SPLIT, Platform, start_platform

MODEL = "tiny"
NUM_STREAMS = 24
NUM_TOKENS = 48


def children(platform: Platform, role: str, pattern: str | None = None) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(platform.process.pid), "-f",
                          pattern or f"role {role}"],
                         capture_output=True, text=True, check=False).stdout
    return [int(pid) for pid in out.split()]


def prompts() -> list[str]:
    return [f"The {i}th story of the river town begins when" for i in range(NUM_STREAMS)]


async def stream_all(client: openai.AsyncOpenAI, texts: Sequence[str],
                     on_progress: asyncio.Event | None = None) -> list[tuple[str, int]]:
    """Stream every prompt at once; set ``on_progress`` once two streams have tokens (the
    others are then still queued or running on both instances)."""
    progressed: set[int] = set()

    async def one(i: int, prompt: str) -> tuple[str, int]:
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=NUM_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        parts: list[str] = []
        completion_tokens = -1
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].text)
            if chunk.usage is not None:
                completion_tokens = chunk.usage.completion_tokens
            if on_progress is not None and len(parts) >= 2:
                progressed.add(i)
                if len(progressed) >= 2:
                    on_progress.set()
        return "".join(parts), completion_tokens

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(texts))))


async def healed(platform: Platform, num_instances: int, timeout_s: float = 120) -> None:
    """Wait until all ``num_instances`` instances are registered and healthy (at start, or
    once the platform restarted what died). /health answers 200 as soon as one instance
    serves, so a test that kills "one of two" must wait for the second itself: killing an
    instance the gateway never routed to exercises no failover."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        body = httpx.get(f"{platform.root_url}/health/ready", timeout=5).json()
        if (body["models"].get(MODEL) == "ready"
                and body["healthy_instances"] >= num_instances):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"not healed: {body}\n{platform.log()[-3000:]}")


async def killed_mid_stream(platform: Platform, role: str,
                            pattern: str | None = None) -> list[tuple[str, int]]:
    client = openai.AsyncOpenAI(base_url=platform.base_url, api_key="x", max_retries=0,
                                timeout=120)
    try:
        reference = await asyncio.wait_for(stream_all(client, prompts()), 120)
        assert all(n == NUM_TOKENS for _, n in reference)
        progressed = asyncio.Event()
        run = asyncio.create_task(stream_all(client, prompts(), progressed))
        await asyncio.wait_for(progressed.wait(), 60)
        victims = children(platform, role, pattern)
        assert victims, f"no {role} engine process found"
        os.kill(victims[0], signal.SIGKILL)
        disturbed = await asyncio.wait_for(run, 180)
        assert disturbed == reference
        return disturbed
    finally:
        await client.close()


async def test_kill_one_of_two_colocated_engines_loses_nothing(
    tiny_dirs: dict[str, Path],
) -> None:
    platform = start_platform(tiny_dirs["llama"], [
        "--served-model-name", MODEL, "--instances", "2", "--max-model-len", "512",
        "--max-num-seqs", "4"])
    try:
        await healed(platform, 2)
        await killed_mid_stream(platform, "colocated")
        failovers = platform.metric("moeflow_failovers_total")
        assert failovers is not None and failovers >= 1, platform.log()[-3000:]
        await healed(platform, 2)  # the lost engine was restarted and serves again
        assert platform.metric("moeflow_engine_restarts_total", role="colocated") == 1
        await killed_mid_stream(platform, "colocated")  # and again, the other way round
        assert platform.process.poll() is None, "the platform must keep running"
    finally:
        platform.stop()


async def test_kill_decode_or_prefill_of_a_split_model_loses_nothing(
    tiny_dirs: dict[str, Path],
) -> None:
    """Two prefill and two decode instances: a lost decode migrates its requests (prompt +
    streamed tokens go to the other pair), a lost prefill is retried on the other prefill."""
    platform = start_platform(tiny_dirs["llama"], [
        "--served-model-name", MODEL, "--mode", "pd", "--prefill", "2", "--decode", "2",
        *ALWAYS_SPLIT,
        "--max-model-len", "512", "--max-num-seqs", "4"])
    try:
        await healed(platform, 4)
        await killed_mid_stream(platform, "decode")
        await healed(platform, 4)
        await killed_mid_stream(platform, "prefill")
        await healed(platform, 4)
        failovers = platform.metric("moeflow_failovers_total")
        assert failovers is not None and failovers >= 2, platform.log()[-3000:]
        assert platform.process.poll() is None, "the platform must keep running"
    finally:
        platform.stop()


async def test_kill_the_private_redis_of_a_split_model_loses_nothing(
    tiny_dirs: dict[str, Path],
) -> None:
    """KV moves over Redis: kill -9 redis-server with streams in flight; `moeflow up` restarts
    it on the same port, the engines reconnect, and every request finishes with its text."""
    platform = start_platform(tiny_dirs["llama"], [
        "--served-model-name", MODEL, "--mode", "pd", "--prefill", "1", "--decode", "1",
        *ALWAYS_SPLIT,
        "--transport", "redis", "--max-model-len", "512", "--max-num-seqs", "4"])
    try:
        await healed(platform, 2)
        await killed_mid_stream(platform, "redis-server", pattern="redis-server")
        await healed(platform, 2)
        assert platform.process.poll() is None, "the platform must keep running"
    finally:
        platform.stop()
