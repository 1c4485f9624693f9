"""Scale to zero and back, through `moeflow up --min-replicas 0 --idle-window-s 2`.

Real processes and HTTP: the idle engine process is stopped, the model stays listed, and the
next requests wake it (held in a bounded queue, streams kept alive with SSE comments).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.platform_process import Platform, start_platform

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "hello"}]
MAX_WAITING = 20
TIMEOUT_S = 90.0  # per request: nothing may hang past it


def _autoscaled(model_dir: Path, *flags: str) -> Platform:
    return start_platform(model_dir, [
        "--served-model-name", MODEL, "--max-model-len", "256",
        "--min-replicas", "0", "--max-replicas", "1", "--idle-window-s", "2", *flags,
    ])


@pytest.fixture(scope="module")
def autoscaled(tiny_dirs: dict[str, Path]) -> Iterator[Platform]:
    p = _autoscaled(tiny_dirs["llama"], "--max-waiting-for-scale-up", str(MAX_WAITING))
    yield p
    assert p.stop() == 0, p.log()[-3000:]


def wait_for_zero(platform: Platform, timeout_s: float = 60.0) -> None:
    """Until the idle engine process has been stopped and the gateway knows it."""
    stops = platform.log().count("autoscaler: stopped engine")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = httpx.get(f"{platform.root_url}/health", timeout=5)
        is_down = platform.log().count("autoscaler: stopped engine") > stops
        if is_down and health.json()["healthy_instances"] == 0:
            assert health.status_code == 200  # a gateway that can wake its model stays ready
            return
        time.sleep(0.2)
    raise AssertionError(f"not scaled to zero within {timeout_s} s:\n{platform.log()[-3000:]}")


def test_idle_model_scales_to_zero_stays_listed_and_wakes_for_the_next_request(
    autoscaled: Platform,
) -> None:
    wait_for_zero(autoscaled)
    client = openai.OpenAI(base_url=autoscaled.base_url, api_key="none", max_retries=0,
                           timeout=TIMEOUT_S)
    assert [m.id for m in client.models.list().data] == [MODEL]
    started = time.perf_counter()
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert "wake: 1 request(s) wait at zero replicas" in autoscaled.log()
    print(f"request at zero -> reply: {seconds:.2f} s")


async def test_fifty_concurrent_requests_at_zero_succeed_or_get_429(
    autoscaled: Platform,
) -> None:
    wait_for_zero(autoscaled)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
        responses = await asyncio.wait_for(asyncio.gather(
            *(http.post(f"{autoscaled.base_url}/chat/completions", json=body)
              for _ in range(50))
        ), TIMEOUT_S)
    codes = [r.status_code for r in responses]
    num_ok, num_refused = codes.count(200), codes.count(429)
    print(f"50 requests at zero, bound {MAX_WAITING}: {num_ok} x 200, {num_refused} x 429")
    assert num_ok + num_refused == 50, codes
    assert num_ok >= MAX_WAITING and num_refused >= 1, codes  # every held request is served
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "overloaded"
            assert "scale up from zero" in r.json()["error"]["message"]
    assert autoscaled.metric("moeflow_gateway_requests_waiting_for_scale_up", model=MODEL) == 0


def test_a_stream_at_zero_gets_a_keep_alive_comment_before_its_first_token(
    autoscaled: Platform,
) -> None:
    wait_for_zero(autoscaled)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    lines: list[str] = []
    started = time.perf_counter()
    first_token_s = None
    with httpx.stream("POST", f"{autoscaled.base_url}/chat/completions", json=body,
                      timeout=TIMEOUT_S) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line:
                lines.append(line)
            if first_token_s is None and '"content":"' in line and '"content":""' not in line:
                first_token_s = time.perf_counter() - started
    print(f"stream at zero: first token after {first_token_s:.2f} s, "
          f"{lines.count(': keep-alive')} keep-alive(s)")
    assert lines[0] == ": keep-alive"
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert all(line == ": keep-alive" for line in lines[:first_data])
    assert lines[-1] == "data: [DONE]"
    assert any('"content"' in line for line in lines[first_data + 1:])


def test_a_scale_up_that_cannot_succeed_ends_in_503_within_the_deadline(
    tiny_dirs: dict[str, Path], tmp_path: Path,
) -> None:
    model_dir = tmp_path / "vanishing"
    shutil.copytree(tiny_dirs["llama"], model_dir)
    platform = _autoscaled(model_dir, "--scale-up-timeout-s", "3")
    try:
        wait_for_zero(platform)
        shutil.rmtree(model_dir)  # the next engine start fails
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
        started = time.perf_counter()
        r = httpx.post(f"{platform.base_url}/chat/completions", json=body, timeout=TIMEOUT_S)
        assert r.status_code == 503, r.text
        assert 3 <= time.perf_counter() - started < 30
        error = r.json()["error"]
        assert error["code"] == "backend_unavailable"
        assert "scaling up from zero" in error["message"] and "within 3 s" in error["message"]
        assert httpx.get(f"{platform.base_url}/models").json()["data"][0]["id"] == MODEL
    finally:
        platform.stop()
