"""A Model with `source.uri: hf://org/name`: the real operator (kopf on the emulated API server)
runs engine Pods that fetch through huggingface_hub, and what it rendered really serves.

The second half plays kubelet for the Pod the operator made: its container command becomes a
real `moeflow engine` process (only --host/--port moved to a free local port), with the Pod's
env resolved the way the kubelet would (`secretKeyRef` from the emulator's Secrets, `fieldRef`
from the Pod) and each volume mount a temporary folder. The Hub is the local server speaking its
file protocol (tests/local_hub.py, contract-tested against huggingface_hub in
tests/integration/cli/test_cli_any_model.py); never the internet. Tokens must match
transformers' own greedy generate.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
from cluster_kit import NAMESPACE, Cluster, wait_for

from moeflow.domain import naming
from moeflow.text.tokenizer import TextTokenizer
from tests.integration.engine.engine_kit import body, generate
from tests.local_hub import LocalHub, serve_hub
from tests.platform_process import free_port
from tests.reference import hf_greedy

MODELS = "moeflow.dev/v1alpha1/models"
GROUPS = "moeflow.dev/v1alpha1/rolegroups"
INSTANCES = "moeflow.dev/v1alpha1/engineinstances"
HF_TOKEN = "hf_from_the_secret_42"
REPO_ROOT = Path(__file__).resolve().parents[3]


def hub_model(name: str, hub_url: str) -> dict[str, Any]:
    return {"apiVersion": naming.API_VERSION, "kind": "Model", "metadata": {"name": name},
            "spec": {"source": {"uri": "hf://tiny/llama@main", "hub": {
                         "endpoint": hub_url, "tokenSecretRef": {"name": "hf-token"},
                         "cache": {"sizeLimit": "1Gi"}}},
                     # small enough for the test machine; these reach the Pod as env too
                     "engine": {"numThreads": 1, "kvCacheMemory": "16Mi",
                                "maxModelLen": 2048}}}


def token_secret() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"},
            "type": "Opaque",
            "data": {"HF_TOKEN": base64.b64encode(HF_TOKEN.encode()).decode()}}


def kubelet_env(pod: dict[str, Any], cluster: Cluster) -> dict[str, str]:
    """The engine container's env as the kubelet resolves it (fails on what it cannot)."""
    (engine,) = [c for c in pod["spec"]["containers"] if c["name"] == "engine"]
    fields = {"metadata.namespace": NAMESPACE, "status.podIP": "127.0.0.1",
              "metadata.name": pod["metadata"]["name"]}
    env: dict[str, str] = {}
    for var in engine["env"]:
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = cluster.get("v1/secrets", ref["name"])
            assert secret is not None, f"the Pod needs Secret {ref['name']}"
            env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        else:
            env[var["name"]] = fields[source["fieldRef"]["fieldPath"]]
    return env


def local_argv(command: list[str], port: int) -> list[str]:
    """The container's command, on this machine: the same flags, a free local port."""
    assert command[:2] == ["moeflow", "engine"]
    argv = list(command[2:])
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    return [sys.executable, "-m", "moeflow.cli", "engine", *argv]


def run_and_generate(argv: list[str], env: dict[str, str], url: str, log: Path,
                     prompt: tuple[int, ...]) -> list[int]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the engine exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        auth = {"x-moeflow-internal-token": env[naming.INTERNAL_TOKEN_ENV]}
        outcome = generate(url, body("hub-1", prompt, max_tokens=8, temperature=0),
                           headers=auth)
        assert outcome.status == 200, outcome
        return outcome.token_ids
    finally:
        process.kill()
        process.wait(timeout=30)


async def test_an_hf_model_runs_pods_that_fetch_and_serve_it(
        cluster: Cluster, operator: object, tiny_dirs: dict[str, Path],
        tmp_path: Path) -> None:
    model_dir = tiny_dirs["llama"]
    with serve_hub({"tiny/llama": model_dir}) as hub:
        await cluster.apply(token_secret())
        await cluster.apply(hub_model("tiny-hub", hub.url))
        pod = await wait_for(lambda: cluster.get("v1/pods", "tiny-hub-colocated-0"),
                             what="engine pod")
        kubernetes_validate.validate(pod, "1.37.0", strict=True)
        # the hub settings survived the RoleGroup and EngineInstance (closed schemas prune)
        for resource in (GROUPS, INSTANCES):
            (child,) = cluster.objects(resource)
            assert child["spec"]["template"]["source"]["hub"]["endpoint"] == hub.url
            assert child["spec"]["template"]["modelPath"] == "hf://tiny/llama@main"
        assert cluster.validate_everything() > 0
        (engine,) = pod["spec"]["containers"]
        assert engine["command"][2:4] == ["--model", "hf://tiny/llama@main"]
        assert "hf_from" not in str(pod)  # the token is a reference, never a value

        env = await wait_for(lambda: cluster.get(
            "v1/secrets", naming.internal_token_secret_name("tiny-hub")) and kubelet_env(
                pod, cluster), what="internal token Secret")
        # each mount a fresh folder, as an emptyDir would be
        for mount in engine["volumeMounts"]:
            if mount["mountPath"] == env.get("HF_HOME"):
                env["HF_HOME"] = str(tmp_path / mount["name"])
        assert env["HF_HOME"].startswith(str(tmp_path)) and env["HF_HUB_OFFLINE"] == "0"
        env["PATH"] = "/usr/bin:/bin"
        port = free_port()
        prompt = tuple(TextTokenizer.from_dir(model_dir).encode("the river and the town"))
        tokens = await asyncio.to_thread(
            run_and_generate, local_argv(engine["command"], port), env,
            f"http://127.0.0.1:{port}", tmp_path / "engine.log", prompt)
        assert tokens == hf_greedy(model_dir, prompt, 8)
        assert_fetched_with_the_token(hub, Path(env["HF_HOME"]))


def assert_fetched_with_the_token(hub: LocalHub, hf_home: Path) -> None:
    fetched = [(path, auth) for _, path, auth in hub.requests if "/resolve/" in path]
    assert any(path.endswith("model.safetensors") for path, _ in fetched)
    assert all(auth == f"Bearer {HF_TOKEN}" for _, auth in fetched)
    assert (hf_home / "hub" / "models--tiny--llama" / "snapshots").is_dir()
