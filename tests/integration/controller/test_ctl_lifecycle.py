"""A Model's life with the real operator: scaling, a lost Pod, a mode change, an invalid
spec, deletion, and an operator restart in the middle of it all."""

from __future__ import annotations

import asyncio

import kmock
from cluster_kit import Cluster, OperatorRunner, load_example, wait_for

from moeflow.kube import api as kube

MODELS, JOBS, TASKS = ("moeflow.dev/v1alpha1/models", "moeflow.dev/v1alpha1/rolegroups",
                       "moeflow.dev/v1alpha1/engineinstances")
PD = "smollm2-135m-instruct-pd"
DEPLOYMENTS = "apps/v1/deployments"


def is_ready(cluster: Cluster, model: str) -> bool:
    condition = cluster.condition(MODELS, model, "Ready")
    return condition is not None and condition["status"] == "True"


def pod_names(cluster: Cluster) -> list[str]:
    return cluster.names("v1/pods")


def deleted_names(cluster: Cluster, resource: str) -> list[str]:
    """Names of objects of `resource` deleted so far, in deletion order (from API requests)."""
    wanted = kmock.resource(resource)
    return [r.name for r in cluster.emulator.request_log()
            if r.method == "DELETE" and r.resource == wanted]


async def test_scaling_lost_pod_and_mode_change(cluster: Cluster, operator: object) -> None:
    await cluster.apply(load_example("model-pd-disaggregated.yaml"))
    await wait_for(lambda: len(pod_names(cluster)) == 3, what="3 pods")

    # Scale decode up: only decode grows, ranks stay dense.
    await cluster.patch(kube.MODEL, PD, {"spec": {"roles": {"decode": {"replicas": 4}}}})
    await wait_for(lambda: len(pod_names(cluster)) == 5, what="5 pods")
    assert pod_names(cluster) == [f"{PD}-decode-{r}" for r in range(4)] + [f"{PD}-prefill-0"]

    # Scale decode down: the highest ranks go, highest first.
    await cluster.patch(kube.MODEL, PD, {"spec": {"roles": {"decode": {"replicas": 1}}}})
    await wait_for(lambda: cluster.names(TASKS) == [f"{PD}-decode-0", f"{PD}-prefill-0"],
                   what="decode scaled to 1")
    assert deleted_names(cluster, TASKS) == [f"{PD}-decode-3", f"{PD}-decode-2",
                                             f"{PD}-decode-1"]
    await wait_for(lambda: len(cluster.events("ScaledDown")) == 3, what="3 ScaledDown events")
    model = await wait_for(lambda: (m := cluster.get(MODELS, PD)) and m["status"].get(
        "observedGeneration") == 3 and m, what="observedGeneration 3")
    assert model["metadata"]["generation"] == 3
    assert model["status"]["roles"]["decode"]["desired"] == 1

    # A lost Pod is recreated by its Task.
    await cluster.delete(kube.POD, f"{PD}-prefill-0")
    await wait_for(lambda: f"{PD}-prefill-0" in pod_names(cluster), what="prefill pod back")

    # Mode change: the Jobs of roles the new mode lacks are deleted, the new one created.
    await cluster.patch(kube.MODEL, PD, {"spec": {
        "mode": "colocated", "roles": {"prefill": None, "decode": None,
                                      "colocated": {"replicas": 2, "minReplicas": 0}}}})
    await wait_for(lambda: cluster.names(JOBS) == [f"{PD}-colocated"], what="colocated job")
    colocated = [f"{PD}-colocated-0", f"{PD}-colocated-1"]
    await wait_for(lambda: set(colocated) <= set(pod_names(cluster)), what="colocated pods")
    # Old Tasks and Pods are owned by deleted Jobs: the cluster's garbage collector removes
    # them (emulated here), and the operator does not resurrect anything.
    # decode-0 and prefill-0 (Task + Pod each), and the Pods of decode-1..3 whose Tasks the
    # scale-down deleted.
    assert await cluster.emulator.collect_garbage() == 2 * 2 + 3
    assert cluster.names(TASKS) == colocated
    await cluster.mark_ready(PD)
    await wait_for(lambda: is_ready(cluster, PD), what="Ready after the mode change")
    assert pod_names(cluster) == colocated
    assert list(cluster.get(MODELS, PD)["status"]["roles"]) == ["colocated"]  # type: ignore[index]
    cluster.validate_everything()


async def test_the_expert_balancer_follows_the_expert_fleet_and_leaves_with_the_mode(
        cluster: Cluster, operator: object) -> None:
    model = load_example("model-attention-expert-disaggregated.yaml")
    name = model["metadata"]["name"]
    balancer = f"{name}-balancer"
    rbac = ("v1/serviceaccounts", "rbac.authorization.k8s.io/v1/roles",
            "rbac.authorization.k8s.io/v1/rolebindings")

    def argv() -> list[str] | None:
        deployment = cluster.get(DEPLOYMENTS, balancer)
        return deployment and deployment["spec"]["template"]["spec"]["containers"][0]["command"]

    def expected(num_experts: int) -> list[str]:
        return ["moeflow", "balancer", "--discovery", "kubernetes", "--namespace", "default",
                "--served-model-name", name, "--num-expert-instances", str(num_experts)]

    await cluster.apply(model)
    await wait_for(lambda: argv() == expected(2), what="balancer for 2 experts")
    deployment = cluster.get(DEPLOYMENTS, balancer)
    assert deployment is not None and deployment["spec"]["replicas"] == 1
    (owner,) = deployment["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("Model", name, True)
    for resource in rbac:
        assert balancer in cluster.names(resource), resource

    # More expert instances: the balancer's argv (expert URLs by rank) follows.
    await cluster.patch(kube.MODEL, name, {"spec": {"roles": {"expert": {"replicas": 3}}}})
    await wait_for(lambda: argv() == expected(3), what="balancer for 3 experts")
    patched = cluster.get(DEPLOYMENTS, balancer)
    assert patched is not None and patched["metadata"]["uid"] == deployment["metadata"]["uid"]

    # Colocated: nothing to balance; the balancer and its identity go, the gateway's stay.
    await cluster.patch(kube.MODEL, name, {"spec": {
        "mode": "colocated", "transport": None,
        "roles": {"attention": None, "expert": None, "colocated": {"replicas": 1}}}})
    await wait_for(lambda: cluster.get(DEPLOYMENTS, balancer) is None, what="balancer gone")
    await wait_for(lambda: all(cluster.names(r) == [f"{name}-gateway"] for r in rbac),
                   what="only the gateway's ServiceAccount, Role and RoleBinding")
    assert deleted_names(cluster, DEPLOYMENTS) == [balancer]
    await wait_for(lambda: len(cluster.events("Deleted", involved=name)) >= 4 + 2,
                   what="Deleted events (balancer objects, attention and expert Jobs)")
    assert cluster.get(DEPLOYMENTS, f"{name}-gateway") is not None
    cluster.validate_everything()


async def test_invalid_spec_is_degraded_with_an_event_then_fixed(
        cluster: Cluster, operator: object) -> None:
    model = load_example("model-colocated.yaml")
    name = model["metadata"]["name"]
    # min > max passes the JSON schema (the CRD states it in CEL, which only a real API server
    # evaluates), so the operator's own check must catch it.
    model["spec"]["roles"]["colocated"] = {"replicas": 1, "minReplicas": 3, "maxReplicas": 2}
    await cluster.apply(model)
    degraded = await wait_for(lambda: (c := cluster.condition(MODELS, name, "Degraded"))
                              and c["status"] == "True" and c, what="Degraded")
    assert degraded["reason"] == "InvalidSpec"
    assert "spec.roles.colocated" in degraded["message"]
    assert "minReplicas (3) must be <= maxReplicas (2)" in degraded["message"]
    assert "fix:" in degraded["message"]
    assert cluster.condition(MODELS, name, "Ready")["status"] == "False"  # type: ignore[index]
    (event,) = await wait_for(lambda: cluster.events("InvalidSpec", involved=name),
                              what="InvalidSpec event")
    assert event["type"] == "Warning" and "minReplicas" in event["message"]
    assert cluster.names(JOBS) == [] and pod_names(cluster) == []

    await cluster.patch(kube.MODEL, name, {"spec": {"roles": {"colocated": {"minReplicas": 0}}}})
    await wait_for(lambda: pod_names(cluster) == [f"{name}-colocated-0"], what="pod after fix")
    await wait_for(lambda: (c := cluster.condition(MODELS, name, "Degraded"))
                   and c["status"] == "False", what="not Degraded after the fix")


async def test_deleting_a_model_needs_no_finalizer_and_gc_removes_the_rest(
        cluster: Cluster, operator: object) -> None:
    model = load_example("model-attention-expert-disaggregated.yaml")
    name = model["metadata"]["name"]
    await cluster.apply(model)
    await wait_for(lambda: len(pod_names(cluster)) == 3, what="3 pods")
    await cluster.mark_ready(name)
    await wait_for(lambda: is_ready(cluster, name), what="Ready")
    assert not cluster.get(MODELS, name)["metadata"].get("finalizers")  # type: ignore[index]

    await cluster.delete(kube.MODEL, name)
    assert cluster.get(MODELS, name) is None, "no finalizer: the Model goes at once"
    # What remains is the garbage collector's job: every object hangs off the Model through
    # controller owner references. Emulate the GC and check the operator does not fight it.
    num_collected = await cluster.emulator.collect_garbage()
    # jobs, tasks, pods, gateway objects, balancer objects, token Secret, NetworkPolicy
    assert num_collected == 2 + 3 + 3 + 6 + 4 + 1 + 1
    await asyncio.sleep(0.5)  # time to (wrongly) react to the DELETED events
    for resource in ("v1/pods", "v1/services", "apps/v1/deployments", JOBS, TASKS,
                     "v1/secrets", "networking.k8s.io/v1/networkpolicies"):
        assert cluster.objects(resource) == [], resource


async def test_restarting_the_operator_mid_way_creates_no_duplicates(
        cluster: Cluster) -> None:
    model = load_example("model-pd-disaggregated.yaml")
    model["spec"]["roles"]["decode"]["replicas"] = 6
    # Mid-way, deterministically: Pods cannot be created during the first run, so it stops
    # with Jobs and Tasks made and Pod creations failing (and retried).
    cluster.emulator.refuse_creates("v1/pods")
    runner = await OperatorRunner().start()
    await cluster.apply(model)
    await wait_for(lambda: len(cluster.names(TASKS)) == 7, what="7 tasks")
    await wait_for(lambda: num_pod_creations(cluster) >= 7, what="7 refused pod creations")
    await runner.stop()
    assert pod_names(cluster) == []
    cluster.emulator.refuse_creates("v1/pods", False)

    await runner.start()  # a new operator: resume handlers replay everything
    await wait_for(lambda: len(pod_names(cluster)) == 7, what="7 pods")
    await cluster.mark_ready(PD)
    await wait_for(lambda: is_ready(cluster, PD), what="Ready")
    uids = {r: [o["metadata"]["uid"] for o in cluster.objects(r)]
            for r in ("v1/pods", JOBS, TASKS, "v1/services", "apps/v1/deployments")}

    await runner.stop()
    await runner.start()  # restart on a converged cluster: nothing to do
    await asyncio.sleep(1.0)  # resume handlers and status refreshes run
    await runner.stop()
    for resource, before in uids.items():
        after = [o["metadata"]["uid"] for o in cluster.objects(resource)]
        assert after == before, f"{resource} changed across restarts"
    # Nothing was created twice: no object history contains a deletion.
    for resource in ("v1/pods", TASKS, JOBS):
        for obj in cluster.objects(resource):
            key = (resource, "default", obj["metadata"]["name"])
            assert None not in cluster.emulator.objects[key].history.raw, key
    assert cluster.condition(MODELS, PD, "Ready")["status"] == "True"  # type: ignore[index]
    cluster.validate_everything()


def num_pod_creations(cluster: Cluster) -> int:
    pods = kmock.resource("v1/pods")
    return sum(r.method == "POST" and r.resource == pods for r in cluster.emulator.request_log())


async def test_a_name_taken_by_another_owner_is_reported_not_stolen(
        cluster: Cluster, operator: object) -> None:
    model = load_example("model-colocated.yaml")
    name = model["metadata"]["name"]
    foreign = {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": f"{name}-gateway", "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "someone-else",
            "uid": "0000-foreign", "controller": True}]},
        "spec": {"ports": [{"port": 80}]}}
    await cluster.apply(foreign)
    await cluster.apply(model)
    degraded = await wait_for(lambda: (c := cluster.condition(MODELS, name, "Degraded"))
                              and c["status"] == "True" and c, what="Degraded")
    assert degraded["reason"] == "NameConflict"
    assert "controlled by another owner" in degraded["message"]
    assert await wait_for(lambda: cluster.events("NameConflict", involved=name), what="event")
    service = cluster.get("v1/services", f"{name}-gateway")
    assert service is not None and service["spec"]["ports"] == [{"port": 80}]
