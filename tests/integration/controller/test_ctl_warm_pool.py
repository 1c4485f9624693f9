"""WarmPools with the real operator: Pods made to size, a deleted Pod replaced, a resize,
status and Events, and deletion through owner references (the emulated GC)."""

from __future__ import annotations

import asyncio
import time

from cluster_kit import Cluster, load_example, wait_for

from moeflow.controller import kube, naming

POOLS = "moeflow.dev/v1alpha1/warmpools"
POOL = "cpu-pool"


def pods(cluster: Cluster) -> list[str]:
    return [p["metadata"]["name"]
            for p in cluster.objects("v1/pods", {naming.LABEL_WARM_POOL: POOL})]


async def mark_ready(cluster: Cluster, name: str) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    await cluster.patch(kube.POD, name, {"status": {"phase": "Running", "conditions": [
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
