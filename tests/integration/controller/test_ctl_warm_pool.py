"""WarmPools with the real operator: Pods made to size, a deleted Pod replaced, a resize,
status and Events, and deletion through owner references (the emulated GC). Claims: a Model
created while a warm Pod is ready gets its Task's Pod by claiming it (through the claim
client's test double), the pool refills, and a failing claim falls back to a fresh Pod."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
from cluster_kit import Cluster, OperatorRunner, load_example, wait_for

from moeflow.controller.context import WARM_CLAIMS_KEY
from moeflow.controller.settings import OperatorSettings
from moeflow.domain import naming
from moeflow.kube import api as kube
from tests.fake_warm_claims import FakeWarmClaims

POOLS = "moeflow.dev/v1alpha1/warmpools"
TASKS = "moeflow.dev/v1alpha1/engineinstances"
POOL = "cpu-pool"
MODEL = "tiny-warm"
TASK = f"{MODEL}-colocated-0"
PORT = OperatorSettings().engine_port


def pods(cluster: Cluster) -> list[str]:
    return [p["metadata"]["name"]
            for p in cluster.objects("v1/pods", {naming.LABEL_WARM_POOL: POOL})]


async def mark_ready(cluster: Cluster, name: str, pod_ip: str = "127.0.0.9") -> None:
    """Play kubelet for a warm Pod: running, its worker listening (startup probe passed),
    not Ready (its /health answers 503 until claimed)."""
    image = (cluster.get("v1/pods", name) or {})["spec"]["containers"][0]["image"]
    await cluster.patch(kube.POD, name, {"status": {
        "phase": "Running", "podIP": pod_ip,
        "containerStatuses": [{"name": "worker", "started": True, "ready": False,
                               "restartCount": 0, "image": image, "imageID": ""}]}},
        subresource="status")


async def mark_engine_ready(cluster: Cluster, name: str) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    await cluster.patch(kube.POD, name, {"status": {"conditions": [
        {"type": "Ready", "status": "True", "lastTransitionTime": now}]}},
        subresource="status")


def pool_status(cluster: Cluster) -> dict[str, object]:
    return dict((cluster.get(POOLS, POOL) or {}).get("status") or {})


async def test_warm_pool_keeps_its_pods_and_goes_with_its_owner(
        cluster: Cluster, operator: object) -> None:
    await cluster.apply(load_example("warmpool.yaml"))
    await wait_for(lambda: pods(cluster) == [f"{POOL}-0", f"{POOL}-1"], what="2 warm pods")
    uid = cluster.get(POOLS, POOL)["metadata"]["uid"]  # type: ignore[index]
    for name in pods(cluster):
        pod = cluster.get("v1/pods", name)
        assert pod is not None and kube.controller_uid(pod) == uid
        assert pod["metadata"]["labels"][naming.LABEL_WARM_STATE] == naming.WARM_IDLE
    await wait_for(lambda: len(cluster.events("PodCreated", involved=POOL)) == 2,
                   what="2 PodCreated events")
    assert pool_status(cluster)["desired"] == 2

    for name in pods(cluster):
        await mark_ready(cluster, name)
    await wait_for(lambda: pool_status(cluster).get("ready") == 2, what="ready 2")
    assert cluster.condition(POOLS, POOL, "Ready")["status"] == "True"  # type: ignore[index]

    # A lost Pod is replaced (same lowest free number, a new Pod).
    old_uid = cluster.get("v1/pods", f"{POOL}-0")["metadata"]["uid"]  # type: ignore[index]
    await cluster.delete(kube.POD, f"{POOL}-0")
    await wait_for(lambda: (p := cluster.get("v1/pods", f"{POOL}-0"))
                   and p["metadata"]["uid"] != old_uid, what="pod 0 replaced")
    await wait_for(lambda: pool_status(cluster).get("ready") == 1, what="ready 1 of 2")

    # Resize down: the not-ready Pod goes first.
    await cluster.patch(kube.WARM_POOL, POOL, {"spec": {"size": 1}})
    await wait_for(lambda: pods(cluster) == [f"{POOL}-1"], what="1 warm pod")
    await wait_for(lambda: pool_status(cluster).get("desired") == 1
                   and pool_status(cluster).get("ready") == 1, what="status 1/1")
    cluster.validate_everything()

    # Deleting the pool: its Pods hang off it by owner reference; the GC removes them and
    # the operator does not bring them back.
    await cluster.delete(kube.WARM_POOL, POOL)
    assert cluster.get(POOLS, POOL) is None, "no finalizer: the pool goes at once"
    assert await cluster.emulator.collect_garbage() == 1
    await asyncio.sleep(0.5)
    assert pods(cluster) == []


@pytest.fixture
async def claims(cluster: Cluster) -> AsyncIterator[FakeWarmClaims]:
    """The claim client's double (same contract as the HTTP one), in the operator."""
    fake = FakeWarmClaims()
    runner = await OperatorRunner(kopf.Memo({WARM_CLAIMS_KEY: fake})).start()
    yield fake
    await runner.stop()


def model() -> dict[str, Any]:
    return {"apiVersion": "moeflow.dev/v1alpha1", "kind": "Model", "metadata": {"name": MODEL},
            "spec": {"source": {"uri": "store://tiny"}, "roles": {"colocated": {"replicas": 1}}}}


async def ready_pool(cluster: Cluster, claims: FakeWarmClaims, *, answers: bool) -> None:
    pool = load_example("warmpool.yaml")
    await cluster.apply({**pool, "spec": {"size": 1}})
    await wait_for(lambda: pods(cluster) == [f"{POOL}-0"], what="1 warm pod")
    await mark_ready(cluster, f"{POOL}-0")
    if answers:
        claims.add("127.0.0.9", PORT)
    await wait_for(lambda: pool_status(cluster).get("ready") == 1, what="pool ready 1")


async def test_a_task_claims_a_ready_warm_pod_and_the_pool_refills(
        cluster: Cluster, claims: FakeWarmClaims) -> None:
    await ready_pool(cluster, claims, answers=True)
    await cluster.apply(model())
    task = await wait_for(lambda: cluster.get(TASKS, TASK), what="the Task")
    claimed = await wait_for(lambda: (p := cluster.get("v1/pods", f"{POOL}-0")) and kube.
                             controller_uid(p) == task["metadata"]["uid"] and p,
                             what="the warm Pod re-owned by the Task")
    labels = claimed["metadata"]["labels"]
    assert labels[naming.LABEL_TASK] == TASK
    assert labels[naming.LABEL_COMPONENT] == naming.COMPONENT_ENGINE
    assert labels[naming.LABEL_WARM_STATE] == naming.WARM_CLAIMED
    assert [r["kind"] for r in claimed["metadata"]["ownerReferences"]] == ["EngineInstance"]
    await wait_for(lambda: claims.claimed[("127.0.0.9", PORT)], what="the claim sent")
    settings = claims.claimed[("127.0.0.9", PORT)]["settings"]  # type: ignore[index]
    assert (settings["model_path"], settings["served_model_name"]) == ("/models/tiny", MODEL)
    await wait_for(lambda: cluster.events("WarmPodClaimed", involved=TASK),
                   what="WarmPodClaimed event")
    assert cluster.get("v1/pods", TASK) is None, "no Pod of its own: the warm one serves"

    # The pool no longer controls it: it makes a replacement (the next free number).
    await wait_for(lambda: pods(cluster) == [f"{POOL}-0", f"{POOL}-1"], what="a refill")
    refill = cluster.get("v1/pods", f"{POOL}-1")
    assert refill is not None
    assert kube.controller_uid(refill) == cluster.get(POOLS, POOL)["metadata"]["uid"]  # type: ignore[index]

    # The claimed engine turns Ready: the Task mirrors it, reached on the Pod IP.
    await mark_engine_ready(cluster, f"{POOL}-0")
    status = await wait_for(lambda: (t := cluster.get(TASKS, TASK)) and t.get("status", {})
                            .get("phase") == "Ready" and t["status"], what="Task Ready")
    assert status["endpoint"] == f"http://127.0.0.9:{PORT}"
    assert status["podName"] == f"{POOL}-0"
    assert status["coldStart"]["path"] == "warm-pool"
    assert status["coldStart"]["warmPool"] == POOL
    assert status["coldStart"]["podReadySeconds"] >= 0
    cluster.validate_everything()


async def test_a_failing_claim_falls_back_to_a_fresh_pod(
        cluster: Cluster, claims: FakeWarmClaims) -> None:
    await ready_pool(cluster, claims, answers=False)  # the worker does not answer
    old_uid = cluster.get("v1/pods", f"{POOL}-0")["metadata"]["uid"]  # type: ignore[index]
    await cluster.apply(model())
    fresh = await wait_for(lambda: cluster.get("v1/pods", TASK), what="a fresh Pod")
    assert naming.LABEL_WARM_POOL not in fresh["metadata"]["labels"]
    (event,) = await wait_for(lambda: cluster.events("WarmClaimFailed", involved=TASK),
                              what="WarmClaimFailed event")
    assert event["type"] == "Warning" and "no answer" in event["message"]
    # The half-claimed Pod is gone; the pool makes a new one under the free name.
    await wait_for(lambda: (p := cluster.get("v1/pods", f"{POOL}-0"))
                   and p["metadata"]["uid"] != old_uid, what="the pool refilled")
    assert [p["metadata"]["name"] for p in cluster.objects(
        "v1/pods", {naming.LABEL_TASK: TASK})] == [TASK]
