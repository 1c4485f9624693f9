"""WarmPool reconciliation (blocking; run on the handler thread pool by `main`).

`apply_warm_pool` keeps `spec.size` worker Pods that the pool controls: it creates the missing
ones (owner reference to the pool, so deleting the pool lets the garbage collector remove
them), deletes surplus and outdated ones, and writes `status.desired/ready/conditions`. It runs
on every change of the pool and of its Pods (a deleted Pod is replaced on its DELETED event).
No finalizer: nothing outside the cluster is made. Builders and the plan are in
`build_warm_pool`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from moeflow.controller import kube, naming, status
from moeflow.controller.build_warm_pool import build_warm_pod, plan_pool
from moeflow.controller.events import Decision, as_body
from moeflow.controller.kube import KubeApi
from moeflow.controller.settings import OperatorSettings
from moeflow.controller.spec import SpecError, WarmPoolSpec, parse_spec


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
