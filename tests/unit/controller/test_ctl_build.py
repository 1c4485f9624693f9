"""Pure builders: every manifest passes the Kubernetes 1.37 schemas (strict), and carries the
engine CLI, probes, transport env, devices and volumes the spec asks for."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from moeflow.controller.build_engine import build_pod, build_task, spec_hash, task_template
from moeflow.controller.build_gateway import build_model_children
from moeflow.controller.settings import OperatorSettings
from moeflow.deviceplugin.settings import DevicePluginSettings
from moeflow.domain import naming
from moeflow.domain.plan import plan_model
from moeflow.domain.roles import Role
from moeflow.domain.spec import JobSpec, TaskSpec, parse_model_spec, parse_spec

SETTINGS = OperatorSettings()


def model_spec(**extra: Any) -> Any:
    return parse_model_spec({"source": {"uri": "store://smol"}, **extra})


def pod_for(source: str = "store://smol", **extra: Any) -> dict[str, Any]:
    spec = model_spec(source={"uri": source}, **extra)
    plan = plan_model("m", spec, namespace="ns")
    job = parse_spec(JobSpec, build_model_children(plan, "ns", SETTINGS)[-1]["spec"])
    task = parse_spec(TaskSpec, build_task("m-colocated", "ns", job, 0)["spec"])
    return build_pod("m-colocated-0", "ns", task, SETTINGS)


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, "1.37.0", strict=True)


@pytest.mark.parametrize("mode", ["colocated", "pd-disaggregated",
                                  "attention-expert-disaggregated"])
def test_all_built_in_children_are_valid_kubernetes(mode: str) -> None:
    spec = model_spec(mode=mode, transport={"redisUrl": "redis://r:6379/0"}, devicesPerInstance=1,
                      resources={"cpu": "2", "memory": "4Gi"})
    children = build_model_children(plan_model("m", spec, namespace="ns"), "ns", SETTINGS)
    kinds = [c["kind"] for c in children]
    assert kinds[:7] == ["ServiceAccount", "Role", "RoleBinding", "Service", "Service",
                         "NetworkPolicy", "Deployment"]
    # attention/expert: the expert balancer's RBAC, then its Deployment
    balancer = ["ServiceAccount", "Role", "RoleBinding", "Deployment"] if (
        mode == "attention-expert-disaggregated") else []
    assert kinds[7:] == balancer + ["RoleGroup"] * len(spec.role_names)
    for child in children[:7 + len(balancer)]:
        validate(child)


def test_engine_pod_runs_the_engine_cli_with_probes_and_env() -> None:
    pod = pod_for()
    validate(pod)
    (container,) = pod["spec"]["containers"]
    assert container["command"] == [
        "moeflow", "engine", "--model", "/models/smol", "--served-model-name", "m",
        "--role", "colocated", "--rank", "0", "--host", "0.0.0.0", "--port", "8001"]
    for probe, path in (("startupProbe", "/health/live"), ("readinessProbe", "/health/ready"),
                        ("livenessProbe", "/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    assert container["startupProbe"]["failureThreshold"] * 5 == SETTINGS.startup_timeout_s
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MOEFLOW_TRANSPORT"] == "shm" and "MOEFLOW_REDIS_URL" not in env
    assert container["resources"] == {}
    assert pod["metadata"]["labels"][naming.LABEL_TASK] == "m-colocated-0"
    assert pod["spec"]["hostname"] == "m-colocated-0"
    assert pod["spec"]["subdomain"] == "m-instances"


def test_devices_are_requested_only_when_asked_for() -> None:
    pod = pod_for(devicesPerInstance=2, resources={"cpu": "1"})
    validate(pod)
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "1", "moeflow.dev/npu": "2"}
    assert resources["limits"] == resources["requests"]
    custom = OperatorSettings(accelerator_resource="huawei.com/ascend-910")
    spec = parse_spec(TaskSpec, {"model": "m", "roleGroup": "j", "role": "colocated", "rank": 0,
                                 "template": {"image": "i", "source": {"uri": "store://s"},
                                              "modelPath": "/models/s", "devicesPerInstance": 1}})
    limits = build_pod("t", "ns", spec, custom)["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"huawei.com/ascend-910": "1"}


def test_redis_transport_env() -> None:
    pod = pod_for(mode="pd-disaggregated", transport={"redisUrl": "redis://r:6379/0"})
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["MOEFLOW_TRANSPORT"] == "redis"
    assert env["MOEFLOW_REDIS_URL"] == "redis://r:6379/0"


@pytest.mark.parametrize("source, volume, mount", [
    ("store://smol", {"hostPath": {"path": "/var/lib/moeflow/models", "type": "Directory"}},
     {"mountPath": "/models"}),
    ("pvc://weights/llm/smol", {"persistentVolumeClaim": {"claimName": "weights",
                                                          "readOnly": True}},
     {"mountPath": "/models/m", "subPath": "llm/smol"}),
    ("file:///data/smol", {"hostPath": {"path": "/data/smol", "type": "Directory"}},
     {"mountPath": "/models/m"}),
])
def test_weights_volume_per_source(source: str, volume: dict[str, Any],
                                   mount: dict[str, Any]) -> None:
    pod = pod_for(source)
    validate(pod)
    model_volume = pod["spec"]["volumes"][0]
    assert model_volume == {"name": "model", **volume}
    assert pod["spec"]["containers"][0]["volumeMounts"][0] == {
        "name": "model", "readOnly": True, **mount}


@pytest.mark.parametrize("source", ["store://smol", "pvc://weights/smol"])
def test_a_dram_preload_model_maps_the_node_dram_store_read_only(source: str) -> None:
    pod = pod_for(source, dramPreload=True, devicesPerInstance=1)
    validate(pod)
    (container,) = pod["spec"]["containers"]
    assert container["command"][-2:] == ["--model-store", SETTINGS.dram_store_mount_path]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "dram-store"]
    # The agent's and the device plugin's store; missing on a node = an empty store there.
    assert volume["hostPath"] == {"path": "/dev/shm/moeflow-store", "type": "DirectoryOrCreate"}
    assert volume["hostPath"]["path"] == str(DevicePluginSettings().store_host_path)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "dram-store"]
    assert mount == {"name": "dram-store", "mountPath": SETTINGS.dram_store_mount_path,
                     "readOnly": True}
    # Not where the device plugin mounts the same store for device containers: no clash.
    paths = [m["mountPath"] for m in container["volumeMounts"]]
    assert str(DevicePluginSettings().store_container_path) not in paths
    assert len(set(paths)) == len(paths)


def test_without_dram_preload_the_pod_is_as_before() -> None:
    plain, declared_off = pod_for(), pod_for(dramPreload=False)
    assert plain == declared_off
    assert "--model-store" not in plain["spec"]["containers"][0]["command"]
    assert {v["name"] for v in plain["spec"]["volumes"]} == {"model", "dshm"}
    assert spec_hash(pod_for(dramPreload=True)["spec"]) != spec_hash(plain["spec"])


def test_template_hash_changes_with_the_template_only() -> None:
    a, b = pod_for(), pod_for()
    assert a["metadata"]["annotations"] == b["metadata"]["annotations"]
    c = pod_for(resources={"memory": "1Gi"})
    assert spec_hash(c["spec"]) != spec_hash(a["spec"])


def test_job_and_task_carry_the_template_down() -> None:
    spec = model_spec(mode="pd-disaggregated", transport={"redisUrl": "redis://r"})
    template = task_template(spec, "/models/smol", SETTINGS)
    assert template.transport.kind is not None and template.transport.kind.value == "redis"
    plan = plan_model("m", spec)
    job = build_model_children(plan, "ns", SETTINGS)[-1]
    assert job["metadata"]["name"] == "m-decode"
    assert job["spec"]["role"] == "decode" and job["spec"]["replicas"] == 1
    task = build_task("m-decode", "ns", parse_spec(JobSpec, job["spec"]), 0)
    assert task["metadata"]["name"] == naming.task_name("m", Role.DECODE, 0)
    assert task["spec"]["template"] == job["spec"]["template"]


def test_gateway_deployment_and_services() -> None:
    children = build_model_children(plan_model("m", model_spec(gateway={"replicas": 2})),
                                    "ns", SETTINGS)
    by_kind = {(c["kind"], c["metadata"]["name"]): c for c in children}
    deployment = by_kind["Deployment", "m-gateway"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "m-gateway"
    assert deployment["spec"]["selector"]["matchLabels"] == naming.gateway_selector("m")
    assert by_kind["Service", "m-instances"]["spec"]["clusterIP"] == "None"
    assert by_kind["Service", "m-gateway"]["spec"]["selector"] == naming.gateway_selector("m")
    role = by_kind["Role", "m-gateway"]
    assert role["rules"][0]["resources"] == ["engineinstances", "models"]
    assert set(role["rules"][0]["verbs"]) == {"get", "list", "watch"}


def test_balancer_deployment_runs_the_balancer_cli_with_a_task_reading_role() -> None:
    spec = model_spec(mode="attention-expert-disaggregated",
                      transport={"redisUrl": "redis://r:6379/0"},
                      roles={"attention": {"replicas": 2}, "expert": {"replicas": 3}})
    settings = OperatorSettings(image="registry.local/moeflow:dev", image_pull_policy="Always")
    children = build_model_children(plan_model("m", spec, namespace="ns"), "ns", settings)
    by_kind = {(c["kind"], c["metadata"]["name"]): c for c in children}
    deployment = by_kind["Deployment", "m-balancer"]
    validate(deployment)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # never two balancers
    assert deployment["spec"]["selector"]["matchLabels"] == naming.balancer_selector("m")
    assert deployment["metadata"]["labels"] == naming.model_labels("m", "balancer")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "m-balancer"
    (container,) = pod["containers"]
    assert container["command"] == [
        "moeflow", "balancer", "--discovery", "kubernetes", "--namespace", "ns",
        "--served-model-name", "m", "--num-expert-instances", "3"]
    assert (container["image"], container["imagePullPolicy"]) == (
        "registry.local/moeflow:dev", "Always")
    assert children[-1]["spec"]["template"]["image"] == container["image"]  # the engines'
    assert ("Service", "m-balancer") not in by_kind
    role = by_kind["Role", "m-balancer"]
    assert role["rules"] == [{"apiGroups": ["moeflow.dev"], "resources": ["engineinstances"],
                              "verbs": ["get", "list", "watch"]}]
    binding = by_kind["RoleBinding", "m-balancer"]
    assert binding["roleRef"]["name"] == "m-balancer"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "m-balancer",
                                    "namespace": "ns"}]
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        validate(by_kind[kind, "m-balancer"])
    colocated = build_model_children(plan_model("m", model_spec()), "ns", SETTINGS)
    assert not [c for c in colocated if c["metadata"]["name"] == "m-balancer"]
