"""Each example Model in deploy/examples, applied to the emulated cluster with the real
operator, yields the expected Jobs, Tasks, Pods and Services, and becomes Ready once its Pods
are. Discovery then lists its instances."""

from __future__ import annotations

from typing import Any

import pytest
from cluster_kit import Cluster, load_example, wait_for

from moeflow.domain import naming
from moeflow.kube import api as kube
from moeflow.kube.discovery import KubeTaskDiscovery

EXPECTED_ROLES = {
    "model-colocated.yaml": {"colocated": 1},
    "model-pd-disaggregated.yaml": {"prefill": 1, "decode": 2},
    "model-attention-expert-disaggregated.yaml": {"attention": 1, "expert": 2},
}


def token_ref(container: dict[str, Any]) -> dict[str, Any] | None:
    """Where the container's MOEFLOW_INTERNAL_TOKEN comes from (a secretKeyRef)."""
    env = {e["name"]: e for e in container.get("env") or []}
    entry = env.get(naming.INTERNAL_TOKEN_ENV)
    return entry and entry["valueFrom"]["secretKeyRef"]


def controller_of(obj: dict[str, Any]) -> tuple[str, str]:
    (ref,) = [r for r in obj["metadata"]["ownerReferences"] if r.get("controller")]
    assert ref["blockOwnerDeletion"] is True
    return ref["kind"], ref["name"]


@pytest.mark.parametrize("filename", sorted(EXPECTED_ROLES))
async def test_example_model_yields_children_and_becomes_ready(
        cluster: Cluster, operator: object, filename: str) -> None:
    model = load_example(filename)
    name = model["metadata"]["name"]
    roles = EXPECTED_ROLES[filename]
    num_instances = sum(roles.values())
    await cluster.apply(model)

    pods = await wait_for(lambda: len(cluster.objects("v1/pods")) == num_instances
                          and cluster.objects("v1/pods"), what=f"{num_instances} pods")

    # One Job per role of the mode, one Task and one Pod per rank, names deterministic.
    jobs = {j["spec"]["role"]: j for j in cluster.objects("moeflow.dev/v1alpha1/rolegroups")}
    assert {role: j["spec"]["replicas"] for role, j in jobs.items()} == roles
    expected_tasks = sorted(naming.task_name(name, naming.Role(role), rank)
                            for role, n in roles.items() for rank in range(n))
    assert cluster.names("moeflow.dev/v1alpha1/engineinstances") == expected_tasks
    assert [p["metadata"]["name"] for p in pods] == expected_tasks
    for role, job in jobs.items():
        assert job["metadata"]["name"] == f"{name}-{role}"
        assert controller_of(job) == ("Model", name)
    for task in cluster.objects("moeflow.dev/v1alpha1/engineinstances"):
        assert controller_of(task) == ("RoleGroup", f"{name}-{task['spec']['role']}")

    # The Pod runs exactly the engine CLI, with probes, transport env and devices.
    devices = model["spec"].get("devicesPerInstance", 0)
    transport = "shm" if model["spec"].get("mode", "colocated") == "colocated" else "redis"
    for pod in pods:
        task = cluster.get("moeflow.dev/v1alpha1/engineinstances", pod["metadata"]["name"])
        assert task is not None
        assert controller_of(pod) == ("EngineInstance", task["metadata"]["name"])
        (container,) = pod["spec"]["containers"]
        source = model["spec"]["source"]["uri"].removeprefix("store://")
        fleet: list[str] = []  # attention/expert instances learn the other side's size
        if task["spec"]["role"] in ("attention", "expert"):
            fleet += ["--num-expert-instances", str(roles["expert"])]
        if task["spec"]["role"] == "expert":
            fleet += ["--num-attention-instances", str(roles["attention"])]
        if model["spec"].get("dramPreload"):  # maps the weights from the node DRAM store
            fleet += ["--model-store", "/var/lib/moeflow/dram-store"]
        assert container["command"] == [
            "moeflow", "engine", "--model", f"/models/{source}", "--served-model-name", name,
            "--role", task["spec"]["role"], "--rank", str(task["spec"]["rank"]),
            "--host", "0.0.0.0", "--port", "8001", *fleet]
        assert container["image"] == "ghcr.io/moeflow/moeflow:0.1.0"
        assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready",
                                                          "port": "http"}
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
        assert token_ref(container) == {"name": f"{name}-internal-token", "key": "token"}
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MOEFLOW_TRANSPORT"] == transport
        assert ("MOEFLOW_REDIS_URL" in env) == (transport == "redis")
        limits = container["resources"]["limits"]
        assert limits.get("moeflow.dev/npu") == (str(devices) if devices else None)
        assert pod["spec"]["subdomain"] == f"{name}-instances"

    # Gateway: Deployment + ClusterIP Service + RBAC; discovery: a headless Service.
    deployment = cluster.get("apps/v1/deployments", f"{name}-gateway")
    assert deployment is not None and controller_of(deployment) == ("Model", name)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "moeflow", "gateway", "--host", "0.0.0.0", "--port", "8000", "--discovery",
        "kubernetes", "--namespace", "default", "--served-model-name", name]
    assert token_ref(deployment["spec"]["template"]["spec"]["containers"][0]) == {
        "name": f"{name}-internal-token", "key": "token"}
    secret = cluster.get("v1/secrets", f"{name}-internal-token")
    assert secret is not None and controller_of(secret) == ("Model", name)
    policy = cluster.get("networking.k8s.io/v1/networkpolicies", f"{name}-engines")
    assert policy is not None and controller_of(policy) == ("Model", name)
    services = {s["metadata"]["name"]: s for s in cluster.objects("v1/services")}
    assert services[f"{name}-gateway"]["spec"]["type"] == "ClusterIP"
    assert services[f"{name}-instances"]["spec"]["clusterIP"] == "None"
    # Attention/expert only: the expert balancer, a Deployment with its own RBAC, no Service.
    balancer = cluster.get("apps/v1/deployments", f"{name}-balancer")
    if "expert" in roles:
        assert balancer is not None and controller_of(balancer) == ("Model", name)
        (container,) = balancer["spec"]["template"]["spec"]["containers"]
        assert container["command"] == [
            "moeflow", "balancer", "--discovery", "kubernetes", "--namespace", "default",
            "--served-model-name", name, "--num-expert-instances", str(roles["expert"])]
        assert token_ref(container) == {"name": f"{name}-internal-token", "key": "token"}
        assert container["image"] == "ghcr.io/moeflow/moeflow:0.1.0"
        assert f"{name}-balancer" not in services
    else:
        assert balancer is None
    identities = sorted([f"{name}-gateway"] + ([f"{name}-balancer"] if balancer else []))
    for resource in ("v1/serviceaccounts", "rbac.authorization.k8s.io/v1/roles",
                     "rbac.authorization.k8s.io/v1/rolebindings"):
        assert cluster.names(resource) == identities, resource

    # Not ready until the Pods are; then Ready with the per-role counts.
    progressing = cluster.condition("moeflow.dev/v1alpha1/models", name, "Progressing")
    assert progressing is None or progressing["status"] == "True"
    await cluster.mark_ready(name)
    ready = await wait_for(
        lambda: (c := cluster.condition("moeflow.dev/v1alpha1/models", name, "Ready"))
        and c["status"] == "True" and c, what="Model Ready")
    assert ready["reason"] == "AllReplicasReady"
    status = cluster.get("moeflow.dev/v1alpha1/models", name)["status"]  # type: ignore[index]
    assert status["roles"] == {r: {"desired": n, "ready": n, "failed": 0}
                               for r, n in roles.items()}
    assert status["endpoint"] == f"http://{name}-gateway.default.svc.cluster.local:8000"
    assert status["observedGeneration"] == 1
    assert status["readySummary"] == ", ".join(
        [f"{r} {n}/{n}" for r, n in roles.items()] + ["gateway 1/1"])
    assert cluster.events("Created", involved=name), "no Events for the Model's decisions"

    instances = await KubeTaskDiscovery(
        "default", api=kube.KubeApi.from_config(None)).list_instances(name)
    assert [(i.role, i.rank, i.is_ready) for i in instances] == sorted(
        (r, rank, True) for r, n in roles.items() for rank in range(n))
    assert all(i.url.endswith(".default.svc.cluster.local:8001") for i in instances)

    # + the Secret and the NetworkPolicy
    assert cluster.validate_everything() >= 2 * num_instances + 9 + (4 if balancer else 0)
