"""A real ``moeflow engine`` process: SIGTERM drains, a dead engine loop exits non-zero, the
internal token guards work. Tiny llama, one thread; each test starts its own process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from moeflow.web.internal_auth import INTERNAL_TOKEN_ENV, INTERNAL_TOKEN_HEADER
from tests.integration.engine.engine_kit import Outcome, agenerate, body, generate
from tests.integration.engine.loop_killer import FAULT, KILL_REQUEST_ID
from tests.platform_process import free_port

REPO_ROOT = Path(__file__).resolve().parents[3]
TOKEN = "process-token-0123456789"
AUTH = {INTERNAL_TOKEN_HEADER: TOKEN}
PROMPT = (1, 17, 33, 250, 99, 7)


@dataclass
class EngineProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the engine did not exit:\n{self.log()[-3000:]}") from None


@contextmanager
def engine_process(model_dir: Path, *, drain_timeout_s: float = 30.0,
                   module: str = "moeflow.cli") -> Iterator[EngineProcess]:
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="moeflow-engine-", suffix=".log")[1])
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               MOEFLOW_ENGINE_DRAIN_TIMEOUT_S=str(drain_timeout_s))
    env[INTERNAL_TOKEN_ENV] = TOKEN
    argv = [sys.executable, "-m", module, "engine", "--model", str(model_dir),
            "--port", str(port), "--num-threads", "1", "--kv-cache-mb", "16",
            "--max-model-len", "2048"]
    with log_path.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=REPO_ROOT)
    engine = EngineProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the engine exited early:\n{engine.log()[-3000:]}")
            try:
                if httpx.get(f"{engine.url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine did not get ready:\n{engine.log()[-3000:]}")
            time.sleep(0.1)
        yield engine
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def greedy(request_id: str, max_tokens: int) -> dict[str, object]:
    return body(request_id, PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture
def llama(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["llama"]


def test_sigterm_drains_requests_in_flight_then_exits_zero(llama: Path) -> None:
    with engine_process(llama) as engine:
        # the token guards work, health stays open
        refused = httpx.post(f"{engine.url}/v1/generate", json=greedy("no-token", 4))
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_internal_token"
        assert httpx.get(f"{engine.url}/metrics").status_code == 200
        expected = generate(engine.url, greedy("ref", 1500), headers=AUTH).token_ids
        assert len(expected) == 1500

        started = threading.Event()
        seen: dict[str, object] = {}

        async def main() -> Outcome:
            async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
                stream = asyncio.create_task(agenerate(
                    client, engine.url, greedy("in-flight", 1500), first_chunk=started))
                while not started.is_set():
                    await asyncio.sleep(0.001)
                engine.process.send_signal(signal.SIGTERM)
                ready = None
                for _ in range(100):  # the signal lands within a tick
                    ready = await client.get(f"{engine.url}/health/ready")
                    if ready.status_code == 503:
                        break
                    await asyncio.sleep(0.01)
                assert ready is not None
                seen["ready"] = (ready.status_code, ready.json())
                seen["live"] = (await client.get(f"{engine.url}/health/live")).status_code
                seen["new"] = await agenerate(client, engine.url, greedy("new", 4))
                seen["still_running"] = not stream.done()
                return await stream

        in_flight = asyncio.run(main())
        assert seen["still_running"], "the SIGTERM must have landed while the stream ran"
        assert seen["ready"] == (503, {"status": "draining", "loop": "running",
                                       "transport": "none", "role": "colocated"})
        assert seen["live"] == 200
        new = seen["new"]
        assert isinstance(new, Outcome)
        assert (new.status, new.error_code) == (503, "backend_unavailable")
        assert (in_flight.token_ids, in_flight.finish_reason) == (expected, "length")
        assert engine.wait(15) == 0, engine.log()[-3000:]


def test_a_drain_past_its_timeout_fails_what_is_left_and_exits(llama: Path) -> None:
    with engine_process(llama, drain_timeout_s=0.5) as engine:
        started = threading.Event()

        async def main() -> Outcome:
            async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
                stream = asyncio.create_task(agenerate(
                    client, engine.url, greedy("too-long", 2000), first_chunk=started))
                while not started.is_set():
                    await asyncio.sleep(0.001)
                engine.process.send_signal(signal.SIGTERM)
                return await stream

        signalled = time.monotonic()
        cut = asyncio.run(main())
        assert cut.error_code == "backend_unavailable", cut
        assert cut.finish_reason is None and 0 < len(cut.token_ids) < 2000
        assert engine.wait(15) == 0, engine.log()[-3000:]
        assert time.monotonic() - signalled < 10
        assert "drain timeout" in engine.log()


def test_a_dead_engine_loop_fails_open_requests_and_exits_non_zero(llama: Path) -> None:
    with engine_process(llama, module="tests.integration.engine.loop_killer") as engine:
        started = threading.Event()

        async def main() -> tuple[Outcome, Outcome]:
            async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
                stream = asyncio.create_task(agenerate(
                    client, engine.url, greedy("bystander", 1500), first_chunk=started))
                while not started.is_set():
                    await asyncio.sleep(0.001)
                killer = await agenerate(client, engine.url, greedy(KILL_REQUEST_ID, 4))
                return killer, await stream

        killer, bystander = asyncio.run(main())
        for outcome in (killer, bystander):
            assert outcome.error_code == "backend_unavailable", outcome
            assert outcome.error_message is not None and FAULT not in outcome.error_message
        code = engine.wait(20)
        log = engine.log()
        assert code == 1, log[-3000:]
        assert FAULT in log and "engine loop died" in log and "exiting with code 1" in log
