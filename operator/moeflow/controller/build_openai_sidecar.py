"""The OpenAI front in an engine Pod (`spec.openaiSidecar`), for a Gateway API Inference
Extension `InferencePool` (docs/inference-extension.md).

An InferencePool sends OpenAI requests straight to the Pods its endpoint picker chooses, but
an engine speaks only the internal `/v1/generate` (token ids in, NDJSON out). The smallest
honest bridge is the MoEFlow gateway itself, run beside the engine with that one engine as its
only instance (static discovery over localhost): it tokenizes, applies chat templates and
answers OpenAI's API on its own port, while the picker keeps reading the engine's vLLM metrics
on the engine's port. Pure builder: dicts in, dicts out.
"""

from __future__ import annotations

from typing import Any

from moeflow.controller.build_security import internal_token_env
from moeflow.controller.settings import OperatorSettings
from moeflow.domain.spec import OpenAISidecar

Obj = dict[str, Any]
CONTAINER_NAME = "openai"
PORT_NAME = "openai"


def sidecar_argv(sidecar: OpenAISidecar, engine_port: int) -> tuple[str, ...]:
    """A gateway whose only instance is the engine in the same Pod."""
    return ("moeflow", "gateway", "--host", "0.0.0.0", "--port", str(sidecar.port),
            "--discovery", "static", "--engine", f"http://127.0.0.1:{engine_port}")


def _probe(path: str, *, period_s: int, failure_threshold: int) -> Obj:
    return {"httpGet": {"path": path, "port": PORT_NAME}, "periodSeconds": period_s,
            "timeoutSeconds": 3, "failureThreshold": failure_threshold}


def build_openai_sidecar(model: str, sidecar: OpenAISidecar, *, image: str, engine_port: int,
                         settings: OperatorSettings) -> Obj:
    """The `openai` container. Its readiness follows the engine's (the gateway's /health/ready
    is 503 while its engine cannot serve), so the Pod joins the pool only when both can. It
    starts beside the engine and waits for it as long as the engine may take to start."""
    return {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(sidecar_argv(sidecar, engine_port)),
        "ports": [{"name": PORT_NAME, "containerPort": sidecar.port, "protocol": "TCP"}],
        # the engine answers /v1/generate only with the Model's internal token
        "env": [internal_token_env(model),
                {"name": "MOEFLOW_GATEWAY_ENGINE_STARTUP_TIMEOUT_S",
                 "value": str(settings.startup_timeout_s)}],
        "resources": {
            "requests": {"cpu": settings.gateway_cpu, "memory": settings.gateway_memory},
            "limits": {"memory": settings.gateway_memory},
        },
        # the gateway answers only once its engine reported its model (it loads weights first)
        "startupProbe": _probe("/health/live", period_s=5,
                               failure_threshold=max(1, settings.startup_timeout_s // 5) + 2),
        "readinessProbe": _probe("/health/ready", period_s=5, failure_threshold=2),
        "livenessProbe": _probe("/health/live", period_s=10, failure_threshold=3),
    }
