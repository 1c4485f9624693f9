"""Documented variables reach a real process: `moeflow gateway` started with MOEFLOW_* only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from moeflow.web.internal_auth import INTERNAL_TOKEN_ENV
from tests.integration.engine.test_engine_process import TOKEN, engine_process
from tests.platform_process import free_port


@pytest.fixture(scope="module")
def engine_url(tiny_dirs: dict[str, Path]) -> Iterator[str]:
    """One real tiny engine: a gateway with no engine at all refuses to start."""
    with engine_process(tiny_dirs["llama"]) as engine:
        yield engine.url


def _serve_gateway(engine_url: str, env: dict[str, str], *flags: str) -> subprocess.Popen[bytes]:
    engine = {"MOEFLOW_GATEWAY_ENGINE_URLS": engine_url, INTERNAL_TOKEN_ENV: TOKEN}
    return subprocess.Popen([sys.executable, "-m", "moeflow.cli", "gateway", *flags],
                            env={**os.environ, **engine, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def _wait_live(port: int, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the gateway exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"nothing served on port {port}")


def test_the_gateway_listens_on_moeflow_gateway_port_and_takes_moeflow_api_keys(
        engine_url: str) -> None:
    port = free_port()
    process = _serve_gateway(engine_url,
                             {"MOEFLOW_GATEWAY_PORT": str(port), "MOEFLOW_API_KEYS": "k1,k2"})
    try:
        _wait_live(port, process)
        models = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(models, timeout=5).status_code == 401
        assert [m["id"] for m in httpx.get(models, headers={"authorization": "Bearer k2"},
                                           timeout=5).json()["data"]] == ["tiny-llama"]
    finally:
        process.terminate()
        process.wait(10)


def test_the_port_flag_beats_the_variable(engine_url: str) -> None:
    env_port, flag_port = free_port(), free_port()
    process = _serve_gateway(engine_url, {"MOEFLOW_GATEWAY_PORT": str(env_port)},
                             "--port", str(flag_port))
    try:
        _wait_live(flag_port, process)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{env_port}/health/live", timeout=1)
    finally:
        process.terminate()
        process.wait(10)
