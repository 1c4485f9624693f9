"""`spec.openaiSidecar`: engine Pods an InferencePool can route OpenAI requests to. The builder
adds an `openai` container (the gateway over the Pod's own engine) that the CRDs and Kubernetes
accept; then that container's own command and env, run as a real process next to a real engine
(its secretKeyRef resolved as the kubelet would), answer the official openai client."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import openai
import pytest
from crd_schema import CrdValidator

from moeflow.controller.build_engine import build_pod, build_task
from moeflow.controller.build_gateway import build_model_children
from moeflow.controller.settings import OperatorSettings
from moeflow.domain import naming
from moeflow.domain.plan import plan_model
from moeflow.domain.spec import JobSpec, SpecError, TaskSpec, parse_model_spec, parse_spec
from tests.integration.engine.engine_kit import serve
from tests.platform_process import free_port
from tests.reference import make_engine

TOKEN = "sidecar-test-token"


def model(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "moeflow.dev/v1alpha1", "kind": "Model", "metadata": {"name": "m"},
            "spec": {"source": {"uri": "store://m"}, **spec}}


def built(spec: dict[str, Any], settings: OperatorSettings) -> tuple[list[dict[str, Any]],
                                                                      dict[str, Any]]:
    """The Model's RoleGroup and EngineInstance (as the API server would store them) and the
    Pod of rank 0."""
    plan = plan_model("m", parse_model_spec(spec), namespace="ns")
    group = build_model_children(plan, "ns", settings)[-1]
    job = parse_spec(JobSpec, group["spec"])
    instance = build_task(group["metadata"]["name"], "ns", job, 0)
    task = parse_spec(TaskSpec, instance["spec"])
    return [group, instance], build_pod(instance["metadata"]["name"], "ns", task, settings)


def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["spec"]["containers"]}


def test_the_sidecar_container_fronts_the_pods_own_engine(crd_validator: CrdValidator) -> None:
    settings = OperatorSettings()
    m = crd_validator.defaulted(model(openaiSidecar={}))
    crd_validator.validate(m)
    assert m["spec"]["openaiSidecar"] == {"port": 8000}  # the CRD's default
    children, pod = built(m["spec"], settings)
    for child in children:
        crd_validator.validate(child)
        assert child["spec"]["template"]["openaiSidecar"] == {"port": 8000}
    kubernetes_validate.validate(pod, "1.37.0", strict=True)
    sidecar = containers(pod)["openai"]
    assert sidecar["command"] == [
        "moeflow", "gateway", "--host", "0.0.0.0", "--port", "8000", "--discovery", "static",
        "--engine", f"http://127.0.0.1:{settings.engine_port}"]
    assert sidecar["ports"] == [{"name": "openai", "containerPort": 8000, "protocol": "TCP"}]
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "openai"}
    assert {"name": naming.INTERNAL_TOKEN_ENV, "valueFrom": {"secretKeyRef": {
        "name": naming.internal_token_secret_name("m"),
        "key": naming.INTERNAL_TOKEN_KEY}}} in sidecar["env"]
    # the engine and its port are as without the sidecar: the picker still scrapes port http
    _, plain = built(model()["spec"], settings)
    assert list(containers(plain)) == ["engine"]
    assert containers(pod)["engine"] == containers(plain)["engine"]
    assert (pod["metadata"]["annotations"][naming.ANNOTATION_TEMPLATE_HASH]
            != plain["metadata"]["annotations"][naming.ANNOTATION_TEMPLATE_HASH])


def test_split_modes_are_refused_by_the_operator() -> None:
    """(and by the CRD's CEL rule: test_ctl_crds.CEL_CASES)"""
    pd = model(mode="pd-disaggregated", transport={"redisUrl": "redis://r"}, openaiSidecar={})
    with pytest.raises(SpecError, match="openaiSidecar serves one engine.*fix: remove"):
        parse_model_spec(pd["spec"])


def _resolved_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's env as the kubelet gives it: the token Secret read, literals kept."""
    env: dict[str, str] = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            assert entry["valueFrom"]["secretKeyRef"]["key"] == naming.INTERNAL_TOKEN_KEY
            env[entry["name"]] = TOKEN
    return env


def test_an_openai_client_gets_a_completion_from_the_sidecar_port(
        tiny_dirs: dict[str, Path]) -> None:
    engine = make_engine(tiny_dirs["llama"], served_model_name="m",
                         MOEFLOW_INTERNAL_TOKEN=TOKEN)
    with serve(engine) as served:
        engine_port = int(served.url.rsplit(":", 1)[1])
        port = free_port()
        _, pod = built(model(openaiSidecar={"port": port})["spec"],
                       OperatorSettings(engine_port=engine_port))
        sidecar = containers(pod)["openai"]
        assert sidecar["command"][0] == "moeflow"
        argv = [sys.executable, "-m", "moeflow.cli", *sidecar["command"][1:]]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOEFLOW_")}
        log = Path(tempfile.mkstemp(prefix="moeflow-sidecar-", suffix=".log")[1])
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                       env={**env, **_resolved_env(sidecar)})
        try:
            ready = f"http://127.0.0.1:{port}/health/ready"
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                try:
                    if httpx.get(ready, timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                   max_retries=0)
            answer = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
                temperature=0)
            assert answer.usage is not None and answer.usage.completion_tokens >= 1
            assert answer.choices[0].message.content
            assert [m.id for m in client.models.list()] == ["m"]
            # the engine port itself still refuses OpenAI clients and tokenless callers
            assert httpx.post(f"{served.url}/v1/chat/completions", json={}).status_code in (
                401, 403, 404)
        finally:
            process.terminate()
            process.wait(timeout=20)
