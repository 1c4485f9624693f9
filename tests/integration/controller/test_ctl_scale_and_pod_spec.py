"""`kubectl scale` of a RoleGroup (its scale subresource, as kubectl and an HPA call it) moves
the role's replicas and the operator follows; a Model's engine args, env, resources,
scheduling and Pod overlay reach its engine Pods. Real operator, emulated API server (the
test shim serves /scale: kube_emulator.py, gap 7)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
from cluster_kit import NAMESPACE, Cluster, load_example, wait_for
from crd_schema import CrdValidator

from moeflow.controller.build_engine import build_pod, build_task
from moeflow.controller.build_gateway import build_model_children
from moeflow.controller.settings import OperatorSettings
from moeflow.domain import naming
from moeflow.domain.plan import plan_model
from moeflow.domain.spec import JobSpec, SpecError, TaskSpec, parse_model_spec, parse_spec
from moeflow.kube import api as kube

MODELS = "moeflow.dev/v1alpha1/models"
ROLE_GROUPS = "moeflow.dev/v1alpha1/rolegroups"
INSTANCES = "moeflow.dev/v1alpha1/engineinstances"
PD = "smollm2-135m-instruct-pd"

CUSTOM_SPEC: dict[str, Any] = {
    "source": {"uri": "store://smol"},
    "image": "registry.example/moeflow:custom",
    "engine": {"dtype": "bfloat16", "kvCacheMemory": "2Gi", "maxModelLen": 4096,
               "maxNumSeqs": 32, "maxNumBatchedTokens": 1024, "enablePrefixCaching": False},
    "env": [{"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
    "resources": {"cpu": "4", "memory": "8Gi"},
    "nodeSelector": {"node.kubernetes.io/instance-type": "c7i.4xlarge"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm",
                     "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
    "podTemplate": {
        "metadata": {"labels": {"team": "search", naming.LABEL_MODEL: "not-mine"},
                     "annotations": {"example.com/owner": "search"}},
        "spec": {"priorityClassName": "serving",
                 "volumes": [{"name": "cache", "emptyDir": {}}],
                 "containers": [{"name": "engine",
                                 "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}]}},
}


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "engine"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def assert_customized(pod: dict[str, Any], model: str) -> None:
    kubernetes_validate.validate(pod, "1.37.0", strict=True)
    spec = pod["spec"]
    (engine,) = [c for c in spec["containers"] if c["name"] == "engine"]
    assert engine["image"] == "registry.example/moeflow:custom"
    env = env_of(pod)
    assert env["MOEFLOW_ENGINE_DTYPE"] == "bfloat16"
    assert env["MOEFLOW_ENGINE_KV_CACHE_BYTES"] == str(2 << 30)
    assert env["MOEFLOW_ENGINE_MAX_MODEL_LEN"] == "4096"
    assert env["MOEFLOW_ENGINE_MAX_NUM_SEQS"] == "32"
    assert env["MOEFLOW_ENGINE_MAX_NUM_BATCHED_TOKENS"] == "1024"
    assert env["MOEFLOW_ENGINE_ENABLE_PREFIX_CACHING"] == "false"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["NODE"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["MOEFLOW_TRANSPORT"] == "shm"  # the operator's own still there
    assert engine["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
    assert spec["nodeSelector"] == CUSTOM_SPEC["nodeSelector"]
    assert spec["tolerations"] == CUSTOM_SPEC["tolerations"]
    assert spec["affinity"] == CUSTOM_SPEC["affinity"]
    assert spec["priorityClassName"] == "serving"
    assert {"name": "cache", "emptyDir": {}} in spec["volumes"]
    assert {"name": "cache", "mountPath": "/cache"} in engine["volumeMounts"]
    assert any(m["name"] == "model" for m in engine["volumeMounts"])  # appended, not replaced
    labels = pod["metadata"]["labels"]
    assert labels["team"] == "search" and labels[naming.LABEL_MODEL] == model  # ours win
    assert pod["metadata"]["annotations"]["example.com/owner"] == "search"


def test_model_pod_settings_render_into_valid_crs_and_pods(crd_validator: CrdValidator) -> None:
    settings = OperatorSettings()
    spec = parse_model_spec(CUSTOM_SPEC)
    children = build_model_children(plan_model("m", spec, namespace="ns"), "ns", settings)
    group = children[-1]
    assert group["kind"] == naming.KIND_ROLE_GROUP
    crd_validator.validate(group)  # closed schema: every field the operator writes is declared
    job = parse_spec(JobSpec, group["spec"])
    instance = build_task(group["metadata"]["name"], "ns", job, 0)
    crd_validator.validate(instance)
    task = parse_spec(TaskSpec, instance["spec"])
    assert_customized(build_pod("m-colocated-0", "ns", task, settings), "m")
    model = {"apiVersion": naming.API_VERSION, "kind": "Model", "metadata": {"name": "m"},
             "spec": CUSTOM_SPEC}
    crd_validator.validate(crd_validator.defaulted(model))


def test_model_pod_settings_are_refused_where_they_would_break_the_engine() -> None:
    bad: list[dict[str, Any]] = [
        {"env": [{"name": "MOEFLOW_INTERNAL_TOKEN", "value": "guess"}]},
        {"engine": {"dtype": "bfloat16"}, "env": [{"name": "MOEFLOW_ENGINE_DTYPE",
                                                   "value": "float32"}]},
        {"engine": {"dtype": "float16"}},
        {"engine": {"kvCacheMemory": "lots"}},
        {"engine": {"maxNumSeqs": 64, "maxNumBatchedTokens": 32}},
        {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]},
        {"podTemplate": {"spec": {"hostname": "x"}}},
        {"podTemplate": {"spec": {"containers": [{"name": "engine", "command": ["sh"]}]}}},
    ]
    for extra in bad:
        try:
            parse_model_spec({"source": {"uri": "store://smol"}, **extra})
        except SpecError:
            continue
        raise AssertionError(f"accepted {extra}")


async def test_a_customized_model_runs_pods_that_carry_its_settings(
        cluster: Cluster, operator: object) -> None:
    await cluster.apply({"apiVersion": naming.API_VERSION, "kind": "Model",
                         "metadata": {"name": "custom"}, "spec": CUSTOM_SPEC})
    pod = await wait_for(lambda: cluster.get("v1/pods", "custom-colocated-0"), what="pod")
    assert_customized(pod, "custom")
    assert cluster.validate_everything() > 0


async def test_kubectl_scale_moves_a_role_and_the_operator_follows(
        cluster: Cluster, operator: object) -> None:
    await cluster.apply(load_example("model-pd-disaggregated.yaml"))
    decode = f"{PD}-decode"
    await wait_for(lambda: (g := cluster.get(ROLE_GROUPS, decode)) and (
        g.get("status") or {}).get("selector"), what="decode RoleGroup status")

    # kubectl scale: GET the Scale, then PATCH its spec.replicas
    scale = await cluster._send("GET", kube.ROLE_GROUP.path(NAMESPACE, decode, "scale"))
    assert scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1"
    assert scale["spec"]["replicas"] == 2
    assert scale["status"]["selector"] == f"{naming.LABEL_JOB}={decode}"
    scaled = await cluster.patch(kube.ROLE_GROUP, decode, {"spec": {"replicas": 4}},
                                 subresource="scale")
    assert scaled["spec"]["replicas"] == 4

    # the operator carries it into the Model, which stays the one source of truth ...
    await wait_for(lambda: cluster.get(MODELS, PD)["spec"]["roles"]["decode"]["replicas"] == 4,
                   what="Model decode replicas 4")
    # ... and runs the instances: ranks 0..3, Pods included
    wanted = [f"{decode}-{rank}" for rank in range(4)]
    await wait_for(lambda: [n for n in cluster.names("v1/pods") if "decode" in n] == wanted,
                   what="4 decode pods")
    # the Model's reconcile writes the RoleGroup again, now as its own replicas
    await wait_for(lambda: cluster.get(ROLE_GROUPS, decode)["metadata"]["annotations"][
        naming.ANNOTATION_APPLIED_REPLICAS] == "4", what="RoleGroup applied from the Model")
    assert cluster.events("Scaled")
    pods = cluster.objects("v1/pods", {naming.LABEL_JOB: decode})  # what the selector selects
    assert sorted(p["metadata"]["name"] for p in pods) == wanted

    # beyond the role's bounds (decode maxReplicas 8): clamped, and said so
    await cluster.patch(kube.ROLE_GROUP, decode, {"spec": {"replicas": 20}}, subresource="scale")
    await wait_for(lambda: cluster.get(MODELS, PD)["spec"]["roles"]["decode"]["replicas"] == 8,
                   what="clamped to maxReplicas 8")
    await wait_for(lambda: cluster.get(ROLE_GROUPS, decode)["spec"]["replicas"] == 8,
                   what="RoleGroup back at 8")
    await wait_for(lambda: len(cluster.names(INSTANCES)) == 8 + 1, what="8 decode + 1 prefill")
    assert cluster.events("ScaleClamped")
    # the prefill role was never touched
    assert cluster.get(MODELS, PD)["spec"]["roles"]["prefill"]["replicas"] == 1
