"""`moeflow up` supervises its processes: real platforms, real kill -9, real HTTP.

- A colocated engine killed under ``--instances 2`` comes back on its port; the restart is
  counted on the gateway's /metrics; the gateway routes around it while it is down and to it
  again once it is back; the platform keeps running.
- A model that fails every start: the platform gives up after ``max_start_failures`` tries
  and exits 1 with one line saying why, in bounded time, leaving no process behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from moeflow.web.internal_auth import INTERNAL_TOKEN_ENV, internal_headers
from tests.platform_process import Platform, free_port, start_platform

MODEL = "tiny"


def engine_children(platform_pid: int) -> dict[int, tuple[int, str]]:
    """rank -> (pid, url) of the engine processes `moeflow up` runs now."""
    out = subprocess.run(["pgrep", "-a", "-P", str(platform_pid), "-f", "moeflow.cli"],
                         capture_output=True, text=True, check=False).stdout
    found = {}
    for line in out.splitlines():
        words = line.split()
        if "engine" in words:
            rank = int(words[words.index("--rank") + 1])
            found[rank] = (int(words[0]), f"http://127.0.0.1:{words[words.index('--port') + 1]}")
    return found


def internal_token(pid: int) -> str:
    """The token `moeflow up` gave its engine (from the child's environment)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    values = [e.split(b"=", 1)[1] for e in environ if e.startswith(INTERNAL_TOKEN_ENV.encode())]
    assert values and values[0], "every engine child gets the platform's token"
    return values[0].decode()


def prompt_tokens_served(url: str, token: str) -> int:
    stats = httpx.get(f"{url}/v1/stats", headers=internal_headers(token), timeout=5).json()
    return int(stats["num_prompt_tokens_total"])


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str,
               platform: Platform) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout_s} s:\n{platform.log()[-3000:]}")


@pytest.fixture(scope="module")
def two_engines(tiny_dirs: dict[str, Path]) -> Iterator[Platform]:
    p = start_platform(tiny_dirs["llama"], ["--served-model-name", MODEL, "--instances", "2",
                                            "--max-model-len", "256"])
    yield p
    assert p.stop() == 0, p.log()[-3000:]


async def _complete_all(platform: Platform, n: int) -> list[str]:
    client = openai.AsyncOpenAI(base_url=platform.base_url, api_key="x", max_retries=0)
    try:
        results = await asyncio.gather(*(
            client.completions.create(model=MODEL, prompt=f"Story number {i}: once upon a",
                                      max_tokens=16, temperature=0)
            for i in range(n)))
    finally:
        await client.close()
    return [r.choices[0].text for r in results]


def test_a_killed_engine_is_restarted_counted_and_served_again(two_engines: Platform) -> None:
    p = two_engines
    # /health answers once one instance serves: wait for both before killing one
    wait_until(lambda: httpx.get(f"{p.root_url}/health", timeout=5).json()[
        "healthy_instances"] == 2, 60, "the second instance never became healthy", p)
    before = engine_children(p.process.pid)
    assert sorted(before) == [0, 1]
    assert p.metric("moeflow_engine_restarts_total", role="colocated") == 0.0
    killed_pid, url = before[1]

    os.kill(killed_pid, signal.SIGKILL)
    wait_until(lambda: httpx.get(f"{p.root_url}/health", timeout=5).json()[
        "healthy_instances"] == 1, 10, "the gateway did not mark the dead instance", p)
    # while it is down, requests are served (by the survivor)
    assert len(asyncio.run(_complete_all(p, 4))) == 4

    wait_until(lambda: 1 in engine_children(p.process.pid)
               and engine_children(p.process.pid)[1][0] != killed_pid, 20,
               "no new engine process", p)
    new_pid, new_url = engine_children(p.process.pid)[1]
    assert new_url == url  # same port
    wait_until(lambda: httpx.get(f"{p.root_url}/health", timeout=5).json()[
        "healthy_instances"] == 2, 60, "the restarted instance was not revived", p)
    assert p.metric("moeflow_engine_restarts_total", role="colocated") == 1.0
    assert "engine tiny-colocated-1 exited with code -9; restarting it in 0.5 s" in p.log()

    # the gateway routes to it again: concurrent requests spread over both instances
    token = internal_token(new_pid)
    served_before = prompt_tokens_served(new_url, token)
    assert len(asyncio.run(_complete_all(p, 8))) == 8
    assert prompt_tokens_served(new_url, token) > served_before
    assert p.process.poll() is None  # moeflow up keeps running


def test_a_model_that_never_starts_makes_up_give_up(tiny_dirs: dict[str, Path],
                                                    tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_dirs["llama"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    # a supported architecture (so `up` accepts it) whose weights cannot be read: every
    # engine start fails while loading
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    env = dict(os.environ, PYTHONUNBUFFERED="1", MOEFLOW_UP_MAX_START_FAILURES="2")
    log = Path(tempfile.mkstemp(prefix="moeflow-up-", suffix=".log")[1])
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moeflow.cli", "up", "--model", str(broken), "--port",
             str(free_port()), "--num-threads", "1", "--kv-cache-mb", "16"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace")
    assert code == 1, text[-3000:]
    assert elapsed < 120
    last = [line for line in text.splitlines() if line.strip()][-1]
    assert "moeflow up stopped: engine broken-colocated-0 failed to start 2 times in a row" \
        in last and "exited with code 1 while starting" in last and "giving up" in last, last
    assert text.count("started engine broken-colocated-0") == 2  # no third try
    leftover = subprocess.run(["pgrep", "-f", str(broken)], capture_output=True, text=True,
                              check=False).stdout
    assert not leftover.strip(), f"processes left behind: {leftover}"


def test_the_local_scaler_restarts_an_engine_that_dies(tiny_dirs: dict[str, Path]) -> None:
    p = start_platform(tiny_dirs["llama"], ["--served-model-name", MODEL, "--max-model-len",
                                            "256", "--min-replicas", "1", "--max-replicas", "1"])
    try:
        [(pid, url)] = engine_children(p.process.pid).values()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: p.metric("moeflow_engine_restarts_total", role="colocated") == 1.0,
                   20, "the scaler did not restart the engine", p)
        wait_until(lambda: httpx.get(f"{p.root_url}/health", timeout=5).json()[
            "healthy_instances"] == 1, 60, "the restarted engine was not served", p)
        [(new_pid, new_url)] = engine_children(p.process.pid).values()
        assert new_pid != pid and new_url == url
        assert len(asyncio.run(_complete_all(p, 2))) == 2
    finally:
        assert p.stop() == 0, p.log()[-3000:]
