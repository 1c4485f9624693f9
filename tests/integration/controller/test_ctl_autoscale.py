"""The cluster autoscaler with the real operator: an idle Model with minReplicas 0 goes to zero
after its window (Event, status, Jobs and Tasks at zero), and the gateway's Kubernetes
requester wakes it again. Engines are a real HTTP server answering /v1/stats on the Pods' IP
(127.0.0.1) and the operator's engine port."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cluster_kit import NAMESPACE, Cluster, OperatorRunner, wait_for

from moeflow.domain import naming
from moeflow.domain.messages import EngineStats
from moeflow.gateway.kube_scale import KubeScaleUp
from moeflow.kube import api as kube

MODELS, JOBS, TASKS = ("moeflow.dev/v1alpha1/models", "moeflow.dev/v1alpha1/rolegroups",
                       "moeflow.dev/v1alpha1/engineinstances")
NAME = "idle"
IDLE = EngineStats(instance_id=f"{NAME}-colocated-0", role="colocated", num_waiting=0,
                   num_running=0, num_free_blocks=10, num_total_blocks=10,
                   num_prefix_hit_tokens=0, num_prompt_tokens_total=0, num_preemptions_total=0)


class _Engine(BaseHTTPRequestHandler):
    """An idle engine with MOEFLOW_INTERNAL_TOKEN set to `token` (filled in by the test once
    the operator made the Model's Secret): /v1/stats only with it."""

    token: str | None = None
    stats_tokens: list[str | None] = []  # the header of every GET /v1/stats

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/v1/stats":
            _Engine.stats_tokens.append(self.headers.get("x-moeflow-internal-token"))
        authorized = (_Engine.token is not None
                      and self.headers.get("x-moeflow-internal-token") == _Engine.token)
        if not authorized:
            body, status = b'{"error": {"code": "invalid_internal_token"}}', 401
        elif self.path == "/v1/stats":
            body, status = IDLE.model_dump_json().encode(), 200
        else:
            body, status = b"{}", 404
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        return None


@pytest.fixture
def engine_port() -> Iterator[int]:
    _Engine.token, _Engine.stats_tokens = None, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
async def autoscaling_operator(cluster: Cluster, engine_port: int,
                               monkeypatch: pytest.MonkeyPatch
                               ) -> AsyncIterator[OperatorRunner]:
    monkeypatch.setenv("MOEFLOW_OPERATOR_AUTOSCALE_INTERVAL_S", "0.2")
    monkeypatch.setenv("MOEFLOW_OPERATOR_ENGINE_PORT", str(engine_port))
    runner = await OperatorRunner().start()
    yield runner
    await runner.stop()


def model() -> dict[str, Any]:
    return {"apiVersion": "moeflow.dev/v1alpha1", "kind": "Model",
            "metadata": {"name": NAME},
            "spec": {"source": {"uri": "store://tiny"},
                     "roles": {"colocated": {"replicas": 1, "minReplicas": 0, "maxReplicas": 2}},
                     "scaleToZeroAfterSeconds": 1}}


async def mark_engines_ready(cluster: Cluster) -> None:
    """Play kubelet: the Model's engine Pods run, answer on 127.0.0.1, and are Ready."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for pod in cluster.objects("v1/pods", {naming.LABEL_MODEL: NAME}):
        await cluster.patch(kube.POD, pod["metadata"]["name"], {"status": {
            "phase": "Running", "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
        }}, subresource="status")


def replicas(cluster: Cluster) -> int:
    return int((cluster.get(MODELS, NAME) or {})["spec"]["roles"]["colocated"]["replicas"])


def job_replicas(cluster: Cluster) -> int:
    return int((cluster.get(JOBS, f"{NAME}-colocated") or {})["spec"]["replicas"])


async def test_idle_model_scales_to_zero_and_the_gateway_requester_wakes_it(
        cluster: Cluster, autoscaling_operator: OperatorRunner) -> None:
    await cluster.apply(model())
    await wait_for(lambda: cluster.names(TASKS) == [f"{NAME}-colocated-0"], what="task")
    await wait_for(lambda: cluster.get("v1/pods", f"{NAME}-colocated-0"), what="pod")
    # Starting: never idle, whatever the window says.
    await wait_for(lambda: (cluster.get(MODELS, NAME) or {}).get("status", {}).get(
        "autoscaling", {}).get("colocated", {}).get("action") == "hold", what="first decision")
    assert replicas(cluster) == 1
    assert not (cluster.get(MODELS, NAME) or {})["metadata"].get("finalizers")
    # The engine takes the Model's token only: the operator reads it from the Secret.
    secret = cluster.get("v1/secrets", naming.internal_token_secret_name(NAME))
    assert secret is not None
    _Engine.token = base64.b64decode(secret["data"][naming.INTERNAL_TOKEN_KEY]).decode()
    await mark_engines_ready(cluster)
    await wait_for(lambda: (cluster.get(TASKS, f"{NAME}-colocated-0") or {}).get(
        "status", {}).get("ready"), what="task ready")

    # Idle for the 1 s window: to zero. The decision is an Event and in status.
    await wait_for(lambda: replicas(cluster) == 0, timeout_s=10, what="scaled to zero")
    (event,) = await wait_for(lambda: cluster.events("AutoscaleIdle", involved=NAME),
                              what="AutoscaleIdle event")
    assert "colocated: 1 -> 0 replicas" in event["message"] and "idle" in event["message"]
    # It asked the engine for its load with the Model's token (an engine without stats
    # would look idle too, so the decision alone does not show it).
    assert _Engine.stats_tokens and set(_Engine.stats_tokens) == {_Engine.token}
    status = await wait_for(lambda: (s := (cluster.get(MODELS, NAME) or {}).get("status"))
                            and s.get("lastScaleTime") and s, what="lastScaleTime")
    assert status["autoscaling"]["colocated"]["desired"] == 0
    assert status["autoscaling"]["colocated"]["action"] == "idle"
    await wait_for(lambda: job_replicas(cluster) == 0 and cluster.names(TASKS) == [],
                   what="Job at 0, no Tasks")
    await wait_for(lambda: (cluster.get(MODELS, NAME) or {}).get("status", {}).get(
        "roles", {}).get("colocated") == {"desired": 0, "ready": 0, "failed": 0},
        what="status.roles.colocated at 0")

    # A request at zero: the gateway's requester patches the Model, once.
    requester = KubeScaleUp(NAMESPACE, kubeconfig=os.environ["MOEFLOW_OPERATOR_KUBECONFIG"])
    try:
        assert await _in_thread(requester.wake, NAME, 1) is True
        assert await _in_thread(requester.wake, NAME, 1) is False
    finally:
        requester.close()
    assert replicas(cluster) == 1
    await wait_for(lambda: job_replicas(cluster) == 1
                   and cluster.names(TASKS) == [f"{NAME}-colocated-0"], what="woken task")
    # The woken replica is starting: the autoscaler must not take it away again.
    await _sleep(1.5)
    assert replicas(cluster) == 1
    assert len(cluster.events("AutoscaleIdle", involved=NAME)) == 1
    cluster.validate_everything()


async def test_a_model_without_bounds_is_not_autoscaled(
        cluster: Cluster, autoscaling_operator: OperatorRunner) -> None:
    fixed = model()
    fixed["spec"]["roles"]["colocated"] = {"replicas": 1}
    await cluster.apply(fixed)
    await wait_for(lambda: cluster.names(TASKS) == [f"{NAME}-colocated-0"], what="task")
    await mark_engines_ready(cluster)
    await _sleep(1.5)
    assert replicas(cluster) == 1
    assert not (cluster.get(MODELS, NAME) or {})["metadata"].get("finalizers")
    assert "autoscaling" not in (cluster.get(MODELS, NAME) or {}).get("status", {})


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


async def _in_thread(fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)
