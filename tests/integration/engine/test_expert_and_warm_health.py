"""Expert instances and warm workers answer the same health paths as engines and take work
only with the internal token: a real expert app (tiny Qwen3-MoE, in-process XCCL) over real
HTTP, and a real ``moeflow warm-pool --port`` worker process claimed over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from moeflow.engine.ae.expert_app import build_expert_app
from moeflow.engine.config import EngineSettings
from moeflow.web.internal_auth import INTERNAL_TOKEN_ENV, INTERNAL_TOKEN_HEADER
from tests.integration.engine.engine_kit import body, generate, serve_app, wait_until
from tests.platform_process import free_port

TOKEN = "expert-and-warm-token-0123456789"
AUTH = {INTERNAL_TOKEN_HEADER: TOKEN}


def test_expert_instance_health_and_token(tiny_dirs: dict[str, Path]) -> None:
    settings = EngineSettings(
        model_path=tiny_dirs["qwen3_moe"], role="expert", rank=0, num_expert_instances=1,
        num_attention_instances=1, transport="memory", group="expert-health", num_threads=1,
        internal_token=TOKEN)
    app = build_expert_app(settings)
    with serve_app(app) as url:
        assert httpx.get(f"{url}/health/live").json() == {"status": "ok"}
        ready = httpx.get(f"{url}/health/ready")
        assert (ready.status_code, ready.json()) == (200, {
            "status": "ok", "loop": "running", "transport": "ok", "role": "expert"})
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200
        refused = httpx.get(f"{url}/v1/experts/stats")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_internal_token"
        assert httpx.post(f"{url}/v1/experts/unload", json={"experts": [0]}).status_code == 401
        assert httpx.get(f"{url}/v1/experts/stats", headers=AUTH).json()["hosted"] == \
            list(range(8))

        # the XCCL endpoint closes: not ready, and the serving threads (one per attention
        # peer) end with it, so the instance is no longer alive either (restart it)
        app.state.transport.close()
        ready = httpx.get(f"{url}/health/ready")
        assert ready.status_code == 503 and ready.json()["transport"] == "unreachable"
        wait_until(lambda: not app.state.expert_worker.is_healthy, what="the threads to end")
        live = httpx.get(f"{url}/health/live")
        assert (live.status_code, live.json()) == (503, {"status": "unhealthy", "loop": "dead"})
        assert httpx.get(f"{url}/health/ready").json()["loop"] == "dead"


def test_warm_worker_health_claim_token_and_the_engine_it_becomes(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "worker.log"
    argv = [sys.executable, "-m", "moeflow.coldstart.warm_pool_cli", "--socket",
            str(tmp_path / "warm.sock"), "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", INTERNAL_TOKEN_ENV: TOKEN}
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        def listening() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"{url}/health/live", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(listening, timeout_s=60, what="the warm worker to listen")
        for path in ("/health/ready", "/health"):
            answer = httpx.get(f"{url}{path}")
            assert (answer.status_code, answer.json()) == (503, {"status": "warm"})
        settings = EngineSettings(model_path=tiny_dirs["llama"], port=port, num_threads=1,
                                  kv_cache_bytes=16 << 20, max_model_len=256)
        claim = {"settings": settings.model_dump(mode="json"), "weights": None}
        for headers in ({}, {INTERNAL_TOKEN_HEADER: "wrong"}):
            refused = httpx.post(f"{url}/v1/claim", json=claim, headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_internal_token"
        assert httpx.get(f"{url}/v1/warm").status_code == 401
        assert httpx.get(f"{url}/v1/warm", headers=AUTH).json()["state"] == "idle"

        assert httpx.post(f"{url}/v1/claim", json=claim, headers=AUTH).status_code == 202
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health/ready", timeout=5).status_code != 200:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the claimed engine did not get ready"
            time.sleep(0.05)
        # the engine it became holds the worker's token, though the claim named none
        request = body("warm-0", (1, 2, 3, 4), max_tokens=4, temperature=0.0, ignore_eos=True)
        assert generate(url, request).status == 401
        served = generate(url, request, headers=AUTH)
        assert served.status == 200 and served.finish_reason == "length"
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
