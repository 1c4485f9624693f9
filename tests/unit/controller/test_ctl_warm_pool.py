"""WarmPool builders and plan: the worker Pod, which Pods to create or delete, and claims
(which warm Pod a Task may take, the patch that makes it the Task's, the claim message)."""

from __future__ import annotations

from typing import Any

import pytest

from moeflow.controller.build_engine import build_pod
from moeflow.controller.build_warm_pool import (
    ANNOTATION_CLAIMED_AT,
    build_warm_pod,
    claim_message,
    claim_patch,
    claim_refusal,
    claimed_pool,
    is_claimable,
    pick_warm_pod,
    plan_pool,
    pod_fits,
    socket_path,
)
from moeflow.controller.settings import OperatorSettings
from moeflow.controller.status import Counts, task_status, warm_pool_status
from moeflow.domain import naming
from moeflow.domain.roles import Role
from moeflow.domain.spec import TaskSpec, WarmPoolSpec, parse_spec

SETTINGS = OperatorSettings()
HASH = "h1"


def started(ready: bool = True) -> dict[str, Any]:
    return {"phase": "Running", "podIP": "10.0.0.7",
            "containerStatuses": [{"name": "worker", "started": ready, "ready": False}]}


def pod(number: int, *, ready: bool = True, template_hash: str = HASH) -> dict[str, Any]:
    return {"metadata": {"name": f"p-{number}",
                         "annotations": {naming.ANNOTATION_TEMPLATE_HASH: template_hash}},
            "status": started(ready)}


def warm_pod(number: int = 0, spec: dict[str, Any] | None = None, *,
             ready: bool = True) -> dict[str, Any]:
    """A warm Pod as the API server holds it: controlled by its pool, started."""
    built = build_warm_pod("pool", "ns", number, parse_spec(WarmPoolSpec, spec or {}),
                           SETTINGS)
    built["metadata"].update(resourceVersion="41", ownerReferences=[
        {"apiVersion": naming.API_VERSION, "kind": "WarmPool", "name": "pool",
         "uid": "pool-uid", "controller": True}])
    built["status"] = started(ready)
    return built


def task(**template: Any) -> TaskSpec:
    return parse_spec(TaskSpec, {
        "model": "m", "roleGroup": "m-colocated", "role": "colocated", "rank": 1,
        "template": {"image": SETTINGS.image, "source": {"uri": "store://tiny"},
                     "modelPath": f"{SETTINGS.model_mount_path}/tiny",
                     "port": SETTINGS.engine_port, **template}})


TASK_BODY = {"apiVersion": naming.API_VERSION, "kind": "EngineInstance",
             "metadata": {"name": "m-colocated-1", "namespace": "ns", "uid": "task-uid"}}


def test_warm_pod_runs_the_worker_labelled_for_claiming_with_store_and_devices() -> None:
    spec = parse_spec(WarmPoolSpec, {"size": 2, "devicesPerInstance": 2})
    built = build_warm_pod("p", "ns", 3, spec, SETTINGS)
    assert built["metadata"]["name"] == "p-3" and built["metadata"]["namespace"] == "ns"
    labels = built["metadata"]["labels"]
    assert labels[naming.LABEL_WARM_POOL] == "p"
    assert labels[naming.LABEL_WARM_STATE] == naming.WARM_IDLE
    assert labels[naming.LABEL_COMPONENT] == naming.COMPONENT_WARM_POOL
    (container,) = built["spec"]["containers"]
    assert container["image"] == SETTINGS.image
    assert container["command"] == ["moeflow", "warm-pool", "--socket", socket_path(SETTINGS),
                                    "--host", "0.0.0.0", "--port", str(SETTINGS.engine_port)]
    # Serves like an engine Pod once claimed: the same port and HTTP readiness on /health
    # (503 until the claimed engine serves); started = listening = claimable.
    engine = build_pod("t", "ns", task(), SETTINGS)["spec"]["containers"][0]
    assert container["ports"] == engine["ports"]
    assert container["readinessProbe"] == engine["readinessProbe"]
    assert container["startupProbe"]["tcpSocket"] == {"port": "http"}
    assert container["livenessProbe"]["tcpSocket"] == {"port": "http"}
    assert container["resources"]["limits"] == {SETTINGS.accelerator_resource: "2"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["model-store"]["readOnly"] is True
    custom = build_warm_pod("p", "ns", 0, parse_spec(WarmPoolSpec, {"image": "img:2"}),
                            SETTINGS)
    assert custom["spec"]["containers"][0]["image"] == "img:2"
    assert "resources" not in custom["spec"]["containers"][0]
    # The hash depends on the template, not on the number.
    hashes = {build_warm_pod("p", "ns", n, spec, SETTINGS)["metadata"]["annotations"][
        naming.ANNOTATION_TEMPLATE_HASH] for n in range(3)}
    assert len(hashes) == 1


def test_plan_fills_the_lowest_numbers_no_pod_uses_claimed_ones_included() -> None:
    plan = plan_pool("p", 3, HASH, [pod(1)], ["p-0", "p-1"])  # p-0 was claimed
    assert plan.create == (2, 3) and plan.delete == () and plan.num_ready == 1
    assert plan_pool("p", 2, HASH, [], []).create == (0, 1)
    assert plan_pool("p", 2, HASH, [pod(0), pod(1)], ["p-0", "p-1"]).create == ()


def test_plan_deletes_surplus_not_ready_first_then_highest_and_replaces_outdated() -> None:
    owned = [pod(0), pod(1, ready=False), pod(2), pod(3)]
    plan = plan_pool("p", 2, HASH, owned, [f"p-{n}" for n in range(4)])
    assert plan.delete == ("p-1", "p-3") and plan.create == () and plan.num_ready == 2
    outdated = plan_pool("p", 2, HASH, [pod(0), pod(1, template_hash="old")], ["p-0", "p-1"])
    assert outdated.delete == ("p-1",) and outdated.create == (2,)


def test_warm_pool_status_has_counts_and_three_conditions() -> None:
    new = warm_pool_status(Counts(desired=2, ready=1), generation=3, previous={}, now="t")
    assert (new["desired"], new["ready"]) == (2, 1)
    ready, progressing, degraded = new["conditions"]
    assert ready["status"] == "False" and progressing["status"] == "True"
    assert degraded["status"] == "False" and ready["observedGeneration"] == 3
    full = warm_pool_status(Counts(desired=2, ready=2), generation=3, previous=new, now="t2")
    assert full["conditions"][0]["status"] == "True"


def test_a_started_running_worker_is_claimable_a_starting_or_leaving_one_is_not() -> None:
    assert is_claimable(warm_pod())
    assert not is_claimable(warm_pod(ready=False))
    leaving = warm_pod()
    leaving["metadata"]["deletionTimestamp"] = "t"
    assert not is_claimable(leaving)
    assert not is_claimable({"metadata": {}, "status": {"phase": "Pending"}})


def test_a_task_fits_a_warm_pod_of_the_same_image_devices_port_and_store() -> None:
    assert claim_refusal(task()) is None
    assert pod_fits(task(), warm_pod(), SETTINGS)
    two = warm_pod(spec={"devicesPerInstance": 2})
    assert pod_fits(task(devicesPerInstance=2), two, SETTINGS)
    assert not pod_fits(task(), two, SETTINGS)
    assert not pod_fits(task(image="other:1"), warm_pod(), SETTINGS)
    assert pod_fits(task(image="other:1"), warm_pod(spec={"image": "other:1"}), SETTINGS)
    assert not pod_fits(task(port=9000), warm_pod(), SETTINGS)
    assert not pod_fits(task(modelPath="/elsewhere/tiny"), warm_pod(), SETTINGS)
    assert not pod_fits(task(), warm_pod(ready=False), SETTINGS)
    claimed = warm_pod()
    claimed["metadata"]["labels"][naming.LABEL_WARM_STATE] = naming.WARM_CLAIMED
    assert not pod_fits(task(), claimed, SETTINGS)
    foreign = warm_pod()
    foreign["metadata"]["ownerReferences"][0]["kind"] = "EngineInstance"
    assert not pod_fits(task(), foreign, SETTINGS)


@pytest.mark.parametrize(("template", "role", "why"), [
    ({"source": {"uri": "pvc://weights"}}, "colocated", "store"),
    ({"resources": {"cpu": "2"}}, "colocated", "cpu/memory"),
    ({"expertInstances": 1, "attentionInstances": 1}, "expert", "expert"),
    ({}, "decode", "internal token"),  # it would call prefill without the Model's token
])
def test_tasks_a_warm_pod_cannot_serve_are_refused_with_the_reason(
        template: dict[str, Any], role: str, why: str) -> None:
    spec = task(**template).model_copy(update={"role": Role(role)})
    refusal = claim_refusal(spec)
    assert refusal is not None and why in refusal


def test_the_first_fitting_pod_by_name_is_picked() -> None:
    pods = [warm_pod(3), warm_pod(1, ready=False), warm_pod(2)]
    picked = pick_warm_pod(task(), pods, SETTINGS)
    assert picked is not None and picked["metadata"]["name"] == "pool-2"
    assert pick_warm_pod(task(image="x:1"), pods, SETTINGS) is None


def test_the_claim_patch_relabels_reowns_and_is_guarded_by_the_resource_version() -> None:
    patch = claim_patch(warm_pod(), TASK_BODY, task(), "hash-9", "2026-01-01T00:00:00Z")
    meta = patch["metadata"]
    assert meta["resourceVersion"] == "41"
    assert meta["labels"] == {**naming.task_labels("m", task().role, 1),
                              naming.LABEL_WARM_STATE: naming.WARM_CLAIMED}
    assert meta["labels"][naming.LABEL_COMPONENT] == naming.COMPONENT_ENGINE
    assert naming.LABEL_WARM_POOL not in meta["labels"], "kept as is: the number stays taken"
    assert meta["annotations"] == {naming.ANNOTATION_TEMPLATE_HASH: "hash-9",
                                   ANNOTATION_CLAIMED_AT: "2026-01-01T00:00:00Z"}
    assert meta["ownerReferences"] == [
        {"apiVersion": naming.API_VERSION, "kind": "EngineInstance", "name": "m-colocated-1",
         "uid": "task-uid", "controller": True, "blockOwnerDeletion": True}]
    merged = {**warm_pod()["metadata"]["labels"], **meta["labels"]}
    assert claimed_pool({"metadata": {"labels": merged}}) == "pool"
    assert claimed_pool(warm_pod()) is None


def test_the_claim_message_carries_what_the_engine_flags_would() -> None:
    message = claim_message(task())
    assert message == {"weights": None, "settings": {
        "model_path": f"{SETTINGS.model_mount_path}/tiny", "served_model_name": "m",
        "role": "colocated", "rank": 1, "host": "0.0.0.0", "port": SETTINGS.engine_port,
        "transport": "shm"}}
    redis = task(transport={"kind": "redis", "redisUrl": "redis://r:6379"})
    assert claim_message(redis)["settings"]["redis_url"] == "redis://r:6379"


def test_a_claimed_pods_task_status_says_warm_pool_and_times_from_the_claim() -> None:
    pod = warm_pod()
    pod["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    pod["status"]["conditions"] = [{"type": "Ready", "status": "True",
                                    "lastTransitionTime": "2026-01-01T01:00:02Z"}]
    loading = task_status({**pod, "status": started()}, endpoint="e", previous={}, now="t",
                          warm_pool="pool", claimed_at="2026-01-01T01:00:00Z")
    assert loading["coldStart"] == {"path": "warm-pool", "warmPool": "pool"}
    ready = task_status(pod, endpoint="e", previous=loading, now="t", warm_pool="pool",
                        claimed_at="2026-01-01T01:00:00Z")
    assert ready["coldStart"] == {"path": "warm-pool", "warmPool": "pool",
                                  "podReadySeconds": 2.0}
