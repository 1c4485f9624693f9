"""An `hf://org/name[@revision]` Model: the spec parses (and refuses what cannot work), and its
engine Pods, strict-validated against the Kubernetes schemas, run `moeflow engine --model
hf://...` with huggingface_hub's variables, a token only from a Secret, and a cache volume."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from moeflow.controller.build_engine import build_pod, build_task
from moeflow.controller.build_gateway import build_model_children
from moeflow.controller.build_hub import HF_HOME
from moeflow.controller.settings import OperatorSettings
from moeflow.domain.finetune_spec import parse_finetune_spec
from moeflow.domain.plan import plan_model
from moeflow.domain.spec import JobSpec, SpecError, TaskSpec, parse_model_spec, parse_spec

SETTINGS = OperatorSettings()


def hub_pod(uri: str = "hf://Qwen/Qwen3-0.6B@main", hub: dict[str, Any] | None = None,
            **extra: Any) -> dict[str, Any]:
    source: dict[str, Any] = {"uri": uri, **({"hub": hub} if hub is not None else {})}
    spec = parse_model_spec({"source": source, **extra})
    children = build_model_children(plan_model("qwen", spec, namespace="ns"), "ns", SETTINGS)
    job = parse_spec(JobSpec, children[-1]["spec"])
    task = parse_spec(TaskSpec, build_task("qwen-colocated", "ns", job, 0)["spec"])
    pod = build_pod("qwen-colocated-0", "ns", task, SETTINGS)
    kubernetes_validate.validate(pod, "1.37.0", strict=True)
    return pod


def engine_of(pod: dict[str, Any]) -> dict[str, Any]:
    (engine,) = [c for c in pod["spec"]["containers"] if c["name"] == "engine"]
    return engine


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in engine_of(pod)["env"]}


def test_the_engine_fetches_the_uri_itself_into_an_emptydir_cache() -> None:
    pod = hub_pod()
    engine = engine_of(pod)
    assert engine["command"][:6] == ["moeflow", "engine", "--model",
                                     "hf://Qwen/Qwen3-0.6B@main", "--served-model-name", "qwen"]
    env = env_of(pod)
    # online (the image says HF_HUB_OFFLINE=1, so 0 must be explicit), default endpoint, no token
    assert env["HF_HUB_OFFLINE"] == "0" and env["HF_HOME"] == HF_HOME
    assert "HF_ENDPOINT" not in env and "HF_TOKEN" not in env
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["hf-cache"] == {"name": "hf-cache", "emptyDir": {}}
    assert "model" not in volumes  # no weights volume: nothing is mounted from the node
    assert {"name": "hf-cache", "mountPath": HF_HOME} in engine["volumeMounts"]
    assert "securityContext" not in pod["spec"]  # an emptyDir is writable as it is


def test_hub_settings_become_variables_a_secret_ref_and_a_claim() -> None:
    pod = hub_pod("hf://org/private", hub={
        "endpoint": "http://hub-mirror.internal:8080", "offline": True,
        "tokenSecretRef": {"name": "hf-token"}, "cache": {"claimName": "hf-cache-pvc"}})
    env = env_of(pod)
    assert env["HF_ENDPOINT"] == "http://hub-mirror.internal:8080"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["hf-cache"]["persistentVolumeClaim"] == {"claimName": "hf-cache-pvc"}
    assert pod["spec"]["securityContext"]["fsGroup"] == 10001  # the image's user writes it
    assert engine_of(pod)["command"][3] == "hf://org/private"


def test_a_size_limited_cache_and_a_token_key() -> None:
    pod = hub_pod(hub={"tokenSecretRef": {"name": "s", "key": "token"},
                       "cache": {"sizeLimit": "20Gi"}})
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["hf-cache"] == {"name": "hf-cache", "emptyDir": {"sizeLimit": "20Gi"}}
    assert env_of(pod)["HF_TOKEN"] == {"secretKeyRef": {"name": "s", "key": "token"}}


def test_other_sources_get_no_hub_variables() -> None:
    spec = parse_model_spec({"source": {"uri": "store://smol"},
                             "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}]})
    children = build_model_children(plan_model("m", spec, namespace="ns"), "ns", SETTINGS)
    job = parse_spec(JobSpec, children[-1]["spec"])
    pod = build_pod("m-colocated-0", "ns",
                    parse_spec(TaskSpec, build_task("m-colocated", "ns", job, 0)["spec"]),
                    SETTINGS)
    assert "HF_HOME" not in env_of(pod) and env_of(pod)["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize(("spec", "field", "says"), [
    ({"source": {"uri": "hf://Qwen"}}, "spec.source.uri", "hf://<org>/<name>"),
    ({"source": {"uri": "hf://a/b@"}}, "spec.source.uri", "hf://<org>/<name>"),
    ({"source": {"uri": "hf://../b"}}, "spec.source.uri", "hf://<org>/<name>"),
    ({"source": {"uri": "store://m", "hub": {}}}, "spec.source", "hf:// sources only"),
    ({"source": {"uri": "hf://a/b", "hub": {"offline": True}}}, "spec.source.hub",
     "cache.claimName"),
    ({"source": {"uri": "hf://a/b", "hub": {"cache": {"claimName": "c", "sizeLimit": "1Gi"}}}},
     "spec.source.hub.cache", "emptyDir cache only"),
    ({"source": {"uri": "hf://a/b", "hub": {"token": "hf_abc"}}}, "spec.source.hub.token",
     "unknown field"),
    ({"source": {"uri": "hf://a/b", "hub": {"tokenSecretRef": {"key": "k"}}}},
     "spec.source.hub.tokenSecretRef.name", "required"),
    ({"source": {"uri": "hf://a/b"}, "env": [{"name": "HF_ENDPOINT", "value": "http://x"}]},
     "spec.env", "spec.source.hub"),
    ({"source": {"uri": "store://m"}, "env": [{"name": "HF_TOKEN", "value": "hf_abc"}]},
     "spec.env", "literal token"),
])
def test_what_cannot_work_is_refused_with_the_fix(spec: dict[str, Any], field: str,
                                                  says: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_model_spec(spec)
    (problem,) = e.value.problems
    assert problem.startswith(field + ":") and says in problem and "fix:" in problem, problem


def test_a_token_from_a_secret_in_env_is_still_allowed_for_other_sources() -> None:
    spec = parse_model_spec({"source": {"uri": "store://m"}, "env": [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]})
    assert spec.env[0].value is None


def test_a_finetune_base_model_is_never_fetched_from_the_hub() -> None:
    with pytest.raises(SpecError) as e:
        parse_finetune_spec({"baseModel": {"uri": "hf://org/name"},
                             "dataset": {"configMap": {"name": "c"}},
                             "output": {"uri": "pvc://out"}})
    assert "spec.baseModel" in str(e.value) and "store://<name>" in str(e.value)
