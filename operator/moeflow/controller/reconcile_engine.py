"""Job and Task reconciliation (blocking; run on the handler thread pool by `main`).

- `apply_job`: Tasks of ranks 0..replicas-1 exist with the Job's template; Tasks of higher
  ranks are deleted, highest first (scale-down keeps ranks dense).
- `apply_task`: the Task's Pod exists and was built from the current template (Pod specs are
  immutable, so a changed template means delete, then recreate when the deletion lands). A
  missing Pod is first sought in the WarmPools (`claim_warm_pod`): a claimed warm Pod keeps
  its own name `<pool>-<n>` and is found by the Task label and controller reference.
- `sync_task_with_pod`: the Task's status mirrors its Pod; a Pod that disappeared under a
  live Task is recreated (a Task is the controller of exactly one Pod).
- `refresh_job_status`: the Job's ready/failed counts from its Tasks.
Everything is keyed by deterministic names, so replays and restarts create no twins.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from moeflow.controller import engine_report, status
from moeflow.controller.build_engine import build_pod, build_task
from moeflow.controller.build_security import token_of
from moeflow.controller.build_warm_pool import ANNOTATION_CLAIMED_AT, claimed_pool
from moeflow.controller.events import Decision, applied, as_body
from moeflow.controller.reconcile_warm_pool import claim_warm_pod
from moeflow.controller.settings import OperatorSettings
from moeflow.controller.warm_claim import WarmClaimClient
from moeflow.domain import naming
from moeflow.domain.spec import JobSpec, TaskSpec, parse_spec
from moeflow.kube import api as kube
from moeflow.kube.api import KubeApi, OwnershipConflict


def _is_live(obj: Mapping[str, Any] | None) -> bool:
    return obj is not None and not obj["metadata"].get("deletionTimestamp")


def apply_job(api: KubeApi, body: Mapping[str, Any]) -> list[Decision]:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    job = parse_spec(JobSpec, body.get("spec"))
    # One LIST instead of a create-then-read per rank: a Job may have many Tasks.
    existing = {t["metadata"]["name"]: t
                for t in api.list(kube.TASK, namespace, {naming.LABEL_JOB: name})}
    decisions: list[Decision] = []
    for rank in range(job.replicas):
        task = build_task(name, namespace, job, rank)
        kopf.adopt(task, owner=as_body(body))
        outcome = api.apply_known(task, existing.get(task["metadata"]["name"]))
        if outcome != "unchanged":
            decisions.append(applied("Task", task["metadata"]["name"], outcome))
    surplus = [
        task for task in existing.values()
        if kube.controller_uid(task) == meta["uid"]
        and int(task["spec"].get("rank", 0)) >= job.replicas
    ]
    for task in sorted(surplus, key=lambda t: -int(t["spec"].get("rank", 0))):
        if api.delete(kube.TASK, namespace, task["metadata"]["name"]):
            decisions.append(Decision(
                "ScaledDown", f"Task {task['metadata']['name']} deleted: rank"
                f" {task['spec'].get('rank')} >= replicas {job.replicas}"))
    api.patch_status(kube.JOB, namespace, name, {"observedGeneration": meta.get("generation")})
    return decisions


def apply_task(api: KubeApi, settings: OperatorSettings, body: Mapping[str, Any],
               claims: WarmClaimClient | None = None) -> list[Decision]:
    """`claims`: how to hand a warm Pod its instance; None: never claim warm Pods."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    task = parse_spec(TaskSpec, body.get("spec"))
    pod = build_pod(name, namespace, task, settings)
    kopf.adopt(pod, owner=as_body(body))
    desired_hash = pod["metadata"]["annotations"][naming.ANNOTATION_TEMPLATE_HASH]
    labelled = api.list(kube.POD, namespace, {naming.LABEL_TASK: name})
    claimed = [p for p in labelled if p["metadata"]["name"] != name
               and kube.controller_uid(p) == meta["uid"]]
    decisions: list[Decision] = []
    if claimed:  # a claimed warm Pod (a terminating one: its DELETED event retries)
        return _replace_if_outdated(api, claimed[0], desired_hash)
    if not labelled and claims is not None:
        is_claimed, decisions = claim_warm_pod(api, claims, settings, body, task, desired_hash)
        if is_claimed:
            return decisions
    if api.create(pod) is not None:
        return [*decisions, Decision("PodCreated", f"Pod {name} created ({task.role.value}"
                                     f" rank {task.rank})")]
    existing = api.get(kube.POD, namespace, name)
    if existing is None:  # deleted between our 409 and our read: its DELETED event retries
        return decisions
    if kube.controller_uid(existing) != meta["uid"]:
        raise OwnershipConflict(f"Pod {name} exists but is not controlled by Task {name}")
    return [*decisions, *_replace_if_outdated(api, existing, desired_hash)]


def _replace_if_outdated(api: KubeApi, existing: Mapping[str, Any], desired_hash: str
                         ) -> list[Decision]:
    meta = existing["metadata"]
    actual_hash = (meta.get("annotations") or {}).get(naming.ANNOTATION_TEMPLATE_HASH)
    if actual_hash != desired_hash and _is_live(existing):
        api.delete(kube.POD, meta["namespace"], meta["name"])
        return [Decision("PodReplaced", f"Pod {meta['name']} deleted to apply a new template"
                         f" ({actual_hash} -> {desired_hash}); it is recreated once gone")]
    return []


def sync_task_with_pod(api: KubeApi, settings: OperatorSettings, event_type: str | None,
                       pod: Mapping[str, Any], claims: WarmClaimClient | None = None
                       ) -> tuple[Mapping[str, Any] | None, list[Decision]]:
    """Mirror a Pod event into its Task's status; recreate the Pod if it is gone. Returns the
    Task (None if it is gone too) and the decisions made. A claimed warm Pod has no DNS name
    under the headless Service (hostname and subdomain are fixed at creation), so its
    Task's endpoint is the Pod IP."""
    namespace = pod["metadata"]["namespace"]
    task_name = (pod["metadata"].get("labels") or {}).get(naming.LABEL_TASK)
    task_body = api.get(kube.TASK, namespace, task_name) if task_name else None
    if task_body is None or not _is_live(task_body):
        return None, []  # the Task is gone or going: the GC owns the Pod now
    if kube.controller_uid(pod) != task_body["metadata"]["uid"]:
        return task_body, []  # a Pod of an older Task with the same name
    task = parse_spec(TaskSpec, task_body.get("spec"))
    gone = event_type == "DELETED"
    pod_ip = (pod.get("status") or {}).get("podIP")
    warm_pool = claimed_pool(pod)
    claimed_at = (pod["metadata"].get("annotations") or {}).get(ANNOTATION_CLAIMED_AT)
    endpoint = (f"http://{pod_ip}:{task.template.port}" if warm_pool and pod_ip and not gone
                else naming.instance_url(task.model, task.role, task.rank, namespace,
                                         task.template.port, settings.cluster_domain))
    previous: Mapping[str, Any] = task_body.get("status") or {}
    now = status.now_iso()
    new = status.task_status(None if gone else pod, endpoint=endpoint, previous=previous,
                             now=now, warm_pool=warm_pool, claimed_at=claimed_at)
    if (new["phase"] == status.PHASE_READY and previous.get("phase") != status.PHASE_READY
            and pod_ip and engine_report.needs_report(previous.get("coldStart"))):
        # once, as the Pod turns Ready: the engine's own cold-start steps (docs/coldstart.md),
        # asked with the Model's internal token (engines require it there)
        token = token_of(api.get(kube.SECRET, namespace,
                                 naming.internal_token_secret_name(task.model)))
        reported = engine_report.fetch_cold_start(pod_ip, task.template.port, token=token)
        new = status.task_status(pod, endpoint=endpoint, previous=previous, now=now,
                                 engine_cold_start=reported,
                                 warm_pool=warm_pool, claimed_at=claimed_at)
    if status.changed(previous, new):
        api.patch_status(kube.TASK, namespace, task_body["metadata"]["name"], new)
    decisions: list[Decision] = []
    if previous.get("phase") != new["phase"]:
        failed = new["phase"] == status.PHASE_FAILED
        decisions.append(Decision(f"Phase{new['phase']}", f"{new['reason']}: {new['message']}",
                                  "Warning" if failed else "Normal"))
    if gone:
        decisions += apply_task(api, settings, task_body, claims)
    return task_body, decisions


def refresh_job_status(api: KubeApi, namespace: str, name: str) -> None:
    job = api.get(kube.JOB, namespace, name)
    if not _is_live(job):
        return
    assert job is not None
    previous: Mapping[str, Any] = job.get("status") or {}
    replicas = int(job["spec"].get("replicas", 0))
    tasks = [t for t in api.list(kube.TASK, namespace, {naming.LABEL_JOB: name})
             if kube.controller_uid(t) == job["metadata"]["uid"]]
    new = status.job_status(status.count_tasks(replicas, tasks),
                            role=str(job["spec"].get("role")),
                            generation=job["metadata"].get("generation"), previous=previous,
                            now=status.now_iso())
    if status.changed(previous, new):
        api.patch_status(kube.JOB, namespace, name, new)
