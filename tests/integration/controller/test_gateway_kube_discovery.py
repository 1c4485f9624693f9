"""The gateway, run with `--discovery kubernetes`, serves the instances its Model's Tasks
report as ready, and drops them when their Task goes away (real gateway and engine processes,
Task objects in the emulated API server). At zero instances it stays up (200) and says it can
scale from zero: a request would patch its Model (`moeflow.gateway.kube_scale`)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
import time

import httpx
import openai
from cluster_kit import NAMESPACE, Cluster

from moeflow.controller.build_engine import build_task
from moeflow.controller.build_gateway import build_model_children
from moeflow.controller.settings import OperatorSettings
from moeflow.domain.plan import plan_model
from moeflow.domain.spec import JobSpec, parse_model_spec, parse_spec
from moeflow.kube import api as kube
from tests.platform_process import free_port


async def _wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(f"{url}/health", timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"{url} never became healthy")


async def test_gateway_follows_ready_tasks(
    cluster: Cluster, tiny_dirs: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    engine_port, gateway_port = free_port(), free_port()
    # As on a cluster: engine and gateway read the same MOEFLOW_INTERNAL_TOKEN (the Model's
    # Secret there); the engine takes work only with it.
    token = "the-models-internal-token"
    engine = subprocess.Popen(
        [sys.executable, "-m", "moeflow.cli", "engine", "--model", str(tiny_dirs["llama"]),
         "--served-model-name", "m", "--port", str(engine_port), "--num-threads", "1",
         "--kv-cache-mb", "16"],
        env=dict(os.environ, MOEFLOW_INTERNAL_TOKEN=token),
    )
    env = dict(os.environ, KUBECONFIG=os.environ["MOEFLOW_OPERATOR_KUBECONFIG"],
               MOEFLOW_INTERNAL_TOKEN=token)
    gateway = subprocess.Popen(
        [sys.executable, "-m", "moeflow.cli", "gateway", "--discovery", "kubernetes",
         "--namespace", NAMESPACE, "--served-model-name", "m", "--port", str(gateway_port)],
        env=env,
    )
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    try:
        await _wait_healthy(f"http://127.0.0.1:{engine_port}")
        async with httpx.AsyncClient() as http:  # probes are open, work is not
            engine_url = f"http://127.0.0.1:{engine_port}"
            assert (await http.get(f"{engine_url}/health/live")).status_code == 200
            refused = await http.get(f"{engine_url}/v1/model_info")
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_internal_token"
        spec = parse_model_spec({"source": {"uri": "store://m"}})
        plan = plan_model("m", spec, namespace=NAMESPACE)
        job_obj = build_model_children(plan, NAMESPACE, OperatorSettings())[-1]
        task = build_task("m-colocated", NAMESPACE, parse_spec(JobSpec, job_obj["spec"]), 0)
        await cluster.apply(task)
        name = task["metadata"]["name"]
        await cluster.patch(kube.ENGINE_INSTANCE, name, {"status": {
            "ready": True, "endpoint": f"http://127.0.0.1:{engine_port}"}}, subresource="status")
        await _wait_healthy(gateway_url)
        client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="x", max_retries=0)
        r = await client.completions.create(model="m", prompt="The cat", max_tokens=4)
        assert r.usage is not None and r.usage.completion_tokens >= 1
        await cluster.patch(kube.ENGINE_INSTANCE, name, {"status": {"ready": False}},
                            subresource="status")
        deadline = time.monotonic() + 15
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                if (await http.get(f"{gateway_url}/health")).json()["healthy_instances"] == 0:
                    break
                await asyncio.sleep(0.3)
            health = await http.get(f"{gateway_url}/health")
            assert health.status_code == 200
            assert health.json() == {"status": "ok", "models": {"m": "scaled_to_zero"},
                                     "healthy_instances": 0, "scale_from_zero": True}
        await client.close()
    finally:
        for process in (gateway, engine):
            process.terminate()
            process.wait(timeout=20)
