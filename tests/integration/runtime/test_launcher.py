"""The process launcher against a real engine: token, readiness, drain, stop."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from moeflow.domain.messages import GenerateRequest, SamplingParams
from moeflow.domain.plan import TaskPlan, plan_model
from moeflow.domain.spec import parse_model_spec
from moeflow.engine.config import EngineOptions
from moeflow.runtime.launcher import EngineHandle, EngineStartError, ProcessLauncher
from moeflow.runtime.local import free_ports
from moeflow.web.internal_auth import internal_headers

TOKEN = "launcher-test-token"


def _task(model_dir: Path) -> TaskPlan:
    spec = parse_model_spec({"source": {"uri": f"file://{model_dir}"}})
    plan = plan_model("tiny", spec, model_path=str(model_dir), host="127.0.0.1",
                      engine_ports=free_ports("127.0.0.1", 1), unique_ports=True,
                      discovery="static")
    return plan.jobs[0].tasks[0]


@pytest.fixture(scope="module")
def launcher() -> Iterator[ProcessLauncher]:
    options = EngineOptions(num_threads=1, kv_cache_bytes=32 << 20, max_model_len=1800)
    launcher = ProcessLauncher(options, internal_token=TOKEN)
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def engine(launcher: ProcessLauncher, tiny_dirs: dict[str, Path]) -> Iterator[EngineHandle]:
    handle = launcher.start(_task(tiny_dirs["llama"]))
    try:
        launcher.wait_ready(handle, 120)
        yield handle
    finally:
        launcher.stop(handle, 10)


def test_the_child_gets_the_options_and_the_platforms_token(
    launcher: ProcessLauncher, engine: EngineHandle,
) -> None:
    assert launcher.is_alive(engine) and launcher.exit_code(engine) is None
    assert httpx.get(f"{engine.url}/v1/stats", timeout=5).status_code == 401  # no token
    stats = launcher.stats(engine)  # the launcher sends it
    assert stats is not None and stats.num_running == 0
    info = httpx.get(f"{engine.url}/v1/model_info", headers=internal_headers(TOKEN),
                     timeout=5).json()
    assert info["max_model_len"] == 1800  # MOEFLOW_ENGINE_MAX_MODEL_LEN reached the child


def test_drain_waits_for_the_request_in_flight_then_stop_ends_the_process(
    launcher: ProcessLauncher, engine: EngineHandle,
) -> None:
    request = GenerateRequest(request_id="drain-me", prompt_token_ids=(1, 2, 3),
                              sampling=SamplingParams(max_tokens=1500, temperature=0,
                                                      ignore_eos=True))
    chunks: list[dict[str, object]] = []
    first = threading.Event()

    def generate() -> None:
        with httpx.stream("POST", f"{engine.url}/v1/generate", headers=internal_headers(TOKEN),
                          json=request.model_dump(mode="json"), timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    chunks.append(json.loads(line))
                    first.set()

    thread = threading.Thread(target=generate)
    thread.start()
    assert first.wait(30)
    running = launcher.stats(engine)
    assert running is not None and running.num_running == 1  # still generating
    assert launcher.drain(engine, timeout_s=60)  # returns once nothing runs or waits
    stats = launcher.stats(engine)
    assert stats is not None and stats.is_draining and stats.num_running == 0
    refused = httpx.post(f"{engine.url}/v1/generate", headers=internal_headers(TOKEN),
                         json=request.model_copy(update={"request_id": "late"})
                         .model_dump(mode="json"), timeout=10)
    assert refused.status_code == 503, refused.text  # a draining instance takes nothing new
    thread.join(30)
    assert chunks[-1]["finish_reason"] == "length"  # the one in flight finished whole
    assert sum(len(c["token_ids"]) for c in chunks) == 1500  # type: ignore[arg-type]
    assert launcher.stop(engine, 10) == 0
    assert not launcher.is_alive(engine)


def test_an_engine_that_exits_while_starting_is_a_start_error(
    launcher: ProcessLauncher, tmp_path: Path,
) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    handle = launcher.start(_task(tmp_path))
    with pytest.raises(EngineStartError, match="exited with code 1 while starting") as caught:
        launcher.wait_ready(handle, 120)
    assert caught.value.reason == "exited with code 1 while starting"
    assert launcher.exit_code(handle) == 1
