"""WarmPool reconciliation (blocking; run on the handler thread pool by `main`).

`apply_warm_pool` keeps `spec.size` worker Pods that the pool controls: it creates the missing
ones (owner reference to the pool, so deleting the pool lets the garbage collector remove
them), deletes surplus and outdated ones, and writes `status.desired/ready/conditions`. It runs
on every change of the pool and of its Pods (a deleted Pod is replaced on its DELETED event).
No finalizer: nothing outside the cluster is made. Builders and the plan are in
`build_warm_pool`.

`claim_warm_pod` is the EngineInstance side: when an EngineInstance needs a Pod and an idle warm
Pod fits it, the
Pod is relabelled and re-owned for the EngineInstance in one guarded patch, then told its instance
(`POST /v1/claim` on the Pod IP through a `WarmClaimClient`). If the worker refuses or does
not answer, the half-claimed Pod is deleted and the EngineInstance gets a fresh Pod as usual.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from moeflow.controller import status
from moeflow.controller.build_warm_pool import (
    build_warm_pod,
    claim_message,
    claim_patch,
    claim_refusal,
    pick_warm_pod,
    plan_pool,
)
from moeflow.controller.events import Decision, as_body
from moeflow.controller.settings import OperatorSettings
from moeflow.controller.warm_claim import WarmClaimClient
from moeflow.domain import naming
from moeflow.domain.spec import SpecError, TaskSpec, WarmPoolSpec, parse_spec
from moeflow.kube import api as kube
from moeflow.kube.api import Conflict, KubeApi


def apply_warm_pool(api: KubeApi, settings: OperatorSettings, namespace: str, name: str
                    ) -> tuple[Mapping[str, Any] | None, list[Decision]]:
    """Returns the pool (None if it is gone or going) and the decisions made. An invalid spec
    is reported in status and as an Event, not raised: the next edit retries."""
    pool = api.get(kube.WARM_POOL, namespace, name)
    if pool is None or pool["metadata"].get("deletionTimestamp"):
        return None, []
    meta = pool["metadata"]
    previous: Mapping[str, Any] = pool.get("status") or {}
    try:
        spec = parse_spec(WarmPoolSpec, pool.get("spec"))
    except SpecError as e:
        new = status.invalid_status(str(e), reason="InvalidSpec", previous=previous,
                                    now=status.now_iso())
        if status.changed(previous, new):
            api.patch_status(kube.WARM_POOL, namespace, name, new)
            return pool, [Decision("InvalidSpec", str(e), "Warning")]
        return pool, []
    labelled = api.list(kube.POD, namespace, {naming.LABEL_WARM_POOL: name})
    owned = [p for p in labelled if kube.controller_uid(p) == meta["uid"]
             and not p["metadata"].get("deletionTimestamp")]
    template = build_warm_pod(name, namespace, 0, spec, settings)
    desired_hash = template["metadata"]["annotations"][naming.ANNOTATION_TEMPLATE_HASH]
    plan = plan_pool(name, spec.size, desired_hash, owned,
                     [p["metadata"]["name"] for p in labelled])
    decisions: list[Decision] = []
    for number in plan.create:
        pod = build_warm_pod(name, namespace, number, spec, settings)
        kopf.adopt(pod, owner=as_body(pool))
        if api.create(pod) is not None:
            decisions.append(Decision("PodCreated", f"warm Pod {pod['metadata']['name']}"
                                      f" created ({len(owned) + len(decisions) + 1}"
                                      f"/{spec.size})"))
    for pod_name in plan.delete:
        if api.delete(kube.POD, namespace, pod_name):
            decisions.append(Decision("PodDeleted", f"warm Pod {pod_name} deleted"
                                      " (surplus or outdated template)"))
    new = status.warm_pool_status(
        status.Counts(desired=spec.size, ready=plan.num_ready),
        generation=meta.get("generation"), previous=previous, now=status.now_iso())
    if status.changed(previous, new):
        api.patch_status(kube.WARM_POOL, namespace, name, new)
    return pool, decisions


def claim_warm_pod(api: KubeApi, claims: WarmClaimClient, settings: OperatorSettings,
                   task_body: Mapping[str, Any], task: TaskSpec, template_hash: str
                   ) -> tuple[bool, list[Decision]]:
    """Give the EngineInstance an idle warm Pod that fits it. Returns (claimed, decisions): False
    with
    no decisions when none fits (or another claimer won it), False with a Warning when the
    claim failed (the Pod is deleted); either way the caller creates a fresh Pod."""
    if claim_refusal(task) is not None:
        return False, []
    namespace = task_body["metadata"]["namespace"]
    idle = api.list(kube.POD, namespace, {naming.LABEL_COMPONENT: naming.COMPONENT_WARM_POOL,
                                          naming.LABEL_WARM_STATE: naming.WARM_IDLE})
    pod = pick_warm_pod(task, idle, settings)
    if pod is None:
        return False, []
    pod_name = pod["metadata"]["name"]
    pool = pod["metadata"]["labels"][naming.LABEL_WARM_POOL]
    patch = claim_patch(pod, task_body, task, template_hash, status.now_iso())
    try:
        if api.patch(kube.POD, namespace, pod_name, patch) is None:
            return False, []  # gone meanwhile
    except Conflict:
        # changed meanwhile (another EngineInstance claimed it, the pool deleted it)
        return False, []
    task_name = task_body["metadata"]["name"]
    error = claims.claim(pod["status"]["podIP"], task.template.port, claim_message(task))
    if error is None:
        return True, [Decision("WarmPodClaimed", f"warm Pod {pod_name} of WarmPool {pool}"
                               f" claimed for EngineInstance {task_name}: loading {task.model}")]
    api.delete(kube.POD, namespace, pod_name)
    return False, [Decision("WarmClaimFailed", f"claiming warm Pod {pod_name} of WarmPool"
                            f" {pool} failed ({error}); Pod deleted, a fresh Pod is created",
                            "Warning")]
