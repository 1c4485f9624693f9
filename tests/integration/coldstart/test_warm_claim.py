"""The contract of `WarmClaimClient`, which the operator claims warm Pods through: the HTTP
client against a real warm worker (`moeflow warm-pool --port`, tiny model, localhost) and the
test double the controller tests use pass the same checks: a bad claim is refused and leaves
the worker claimable, one claim is taken, a second is refused (409), nobody listening is an
error, never an exception. The real worker then serves the claimed model on that same port,
and a restarted worker serves its kept claim without being claimed again."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from moeflow.controller.warm_claim import HttpWarmClaims, WarmClaimClient
from tests.fake_warm_claims import FakeWarmClaims
from tests.integration.coldstart.test_coldstart import (
    cold_start_of,
    greedy,
    settings_json,
    wait_healthy,
)
from tests.platform_process import free_port
from tests.reference import make_engine, run_engine

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def model_dir(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["llama"]


def start_worker(run_dir: Path, port: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "moeflow.coldstart.warm_pool_cli", "--socket",
            str(run_dir / "warm.sock"), "--host", HOST, "--port", str(port)]
    log = (run_dir / f"worker-{time.monotonic_ns()}.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    return process


def wait_listening(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the worker exited ({process.returncode})"
        try:
            httpx.get(f"{url}/health", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise TimeoutError(f"{url}: nothing listens after {timeout_s} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(params=["http", "fake"])
def worker(request: pytest.FixtureRequest, tmp_path: Path
           ) -> Iterator[tuple[WarmClaimClient, int, subprocess.Popen[bytes] | None]]:
    port = free_port()
    if request.param == "fake":
        yield FakeWarmClaims([(HOST, port)]), port, None
        return
    process = start_worker(tmp_path, port)
    client = HttpWarmClaims(timeout_s=5.0)
    try:
        wait_listening(f"http://{HOST}:{port}", process)
        yield client, port, process
    finally:
        client.close()
        stop(process)


def test_a_claim_is_taken_once_bad_ones_are_refused_before(
        worker: tuple[WarmClaimClient, int, subprocess.Popen[bytes] | None],
        model_dir: Path) -> None:
    client, port, process = worker
    bad: dict[str, Any] = {"settings": {"port": port, "role": "colocated"}}
    error = client.claim(HOST, port, bad)
    assert error is not None and error.startswith("400") and "model_path" in error
    good = {"settings": settings_json(model_dir, port, host=HOST), "weights": None}
    assert client.claim(HOST, port, good) is None
    again = client.claim(HOST, port, good)
    assert again is not None and again.startswith("409"), again
    if process is None:
        return
    url = f"http://{HOST}:{port}"
    wait_healthy(url)  # the claimed engine, on the worker's own port
    assert greedy(url) == run_engine(make_engine(model_dir), [[1, 5, 9, 14, 3, 27, 8]], 6)[0][0]
    assert cold_start_of(url)["path"] == "warm_pool"
    late = client.claim(HOST, port, good)
    assert late is not None and late.startswith("409"), late


def test_nobody_listening_is_an_error_not_an_exception() -> None:
    port = free_port()
    for client in (HttpWarmClaims(timeout_s=1.0), FakeWarmClaims()):
        error = client.claim(HOST, port, {"settings": {}})
        assert error is not None and "no answer" in error


def test_a_worker_that_does_not_fit_the_claim_says_why_and_a_restart_keeps_the_claim(
        model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://{HOST}:{port}"
    client = HttpWarmClaims(timeout_s=5.0)
    process = start_worker(tmp_path, port)
    try:
        wait_listening(url, process)
        assert httpx.get(f"{url}/health", timeout=2).status_code == 503  # warm, not ready
        assert httpx.get(f"{url}/v1/warm", timeout=2).json()["state"] == "idle"
        other_port = client.claim(HOST, port, {"settings": settings_json(model_dir, port + 1)})
        assert other_port is not None and "settings.port" in other_port
        assert client.claim(HOST, port, {"settings": settings_json(model_dir, port,
                                                                   host=HOST)}) is None
        wait_healthy(url)
        stop(process)  # the container restarts with the same command and emptyDir
        process = start_worker(tmp_path, port)
        wait_healthy(url)
        greedy(url)
        assert cold_start_of(url)["path"] == "warm_pool"
    finally:
        client.close()
        stop(process)
