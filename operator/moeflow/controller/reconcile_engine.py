"""RoleGroup and EngineInstance reconciliation (blocking; run on the handler thread pool by `main`).

- `apply_job`: EngineInstances of ranks 0..replicas-1 exist with the RoleGroup's template;
EngineInstances of higher
  ranks are deleted, highest first (scale-down keeps ranks dense).
- `apply_task`: the EngineInstance's Pod exists and was built from the current template (Pod specs
are
  immutable, so a changed template means delete, then recreate when the deletion lands). A
  missing Pod is first sought in the WarmPools (`claim_warm_pod`): a claimed warm Pod keeps
  its own name `<pool>-<n>` and is found by the EngineInstance label and controller reference.
- `sync_task_with_pod`: the EngineInstance's status mirrors its Pod; a Pod that disappeared under a
  live EngineInstance is recreated (an EngineInstance is the controller of exactly one Pod).
- `apply_job` also follows the scale subresource: a RoleGroup whose spec.replicas differs from
  the replicas the operator last wrote (`scaled_replicas`) was scaled by `kubectl scale`, an
  HPA or KEDA, and the new count is carried into the Model's `spec.roles.<role>.replicas`
  (clamped to the role's bounds, `clamp_replicas`), which stays the one source of truth.
- `refresh_job_status`: the RoleGroup's ready/failed counts from its EngineInstances.
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
from moeflow.domain.spec import JobSpec, RoleSpec, TaskSpec, parse_model_spec, parse_spec
from moeflow.kube import api as kube
from moeflow.kube.api import KubeApi, OwnershipConflict


def _is_live(obj: Mapping[str, Any] | None) -> bool:
    return obj is not None and not obj["metadata"].get("deletionTimestamp")


def scaled_replicas(body: Mapping[str, Any]) -> int | None:
    """The replicas a scale of this RoleGroup asked for, or None when its spec.replicas is
    what the operator last wrote (or it carries no record of that)."""
    applied_text = (body["metadata"].get("annotations") or {}).get(
        naming.ANNOTATION_APPLIED_REPLICAS)
    replicas = (body.get("spec") or {}).get("replicas")
    if applied_text is None or not isinstance(replicas, int) or str(replicas) == applied_text:
        return None
    return replicas


def clamp_replicas(replicas: int, role: RoleSpec) -> int:
    """`replicas` within the role's minReplicas..maxReplicas."""
    high = role.max_replicas if role.max_replicas is not None else replicas
    return max(role.min_replicas, min(replicas, high))


def carry_scale_to_model(api: KubeApi, body: Mapping[str, Any], job: JobSpec, replicas: int
                         ) -> tuple[int, list[Decision]]:
    """Write a scaled RoleGroup's replicas into its Model (optimistic lock on the Model's
    resourceVersion; a Conflict propagates so the handler retries). Returns the replicas the
    RoleGroup should run now and the decisions."""
    meta = body["metadata"]
    model = api.get(kube.MODEL, meta["namespace"], job.model)
    if model is None or kube.controller_uid(body) != model["metadata"]["uid"]:
        return replicas, []
    spec = parse_model_spec(model.get("spec"))
    role_spec = spec.role(job.role)
    wanted = clamp_replicas(replicas, role_spec)
    decisions: list[Decision] = []
    if wanted != replicas:
        decisions.append(Decision(
            "ScaleClamped", f"scale to {replicas} is outside the role's bounds"
            f" [{role_spec.min_replicas}, {role_spec.max_replicas}]; using {wanted}", "Warning"))
    if role_spec.replicas != wanted:
        api.patch(kube.MODEL, meta["namespace"], job.model, {
            "metadata": {"resourceVersion": model["metadata"].get("resourceVersion")},
            "spec": {"roles": {job.role.value: {"replicas": wanted}}}})
        decisions.append(Decision(
            "Scaled", f"RoleGroup scaled to {wanted}: Model {job.model}"
            f" spec.roles.{job.role.value}.replicas {role_spec.replicas} -> {wanted}"))
    return wanted, decisions


def apply_job(api: KubeApi, body: Mapping[str, Any]) -> list[Decision]:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    job = parse_spec(JobSpec, body.get("spec"))
    decisions: list[Decision] = []
    scaled = scaled_replicas(body)
    if scaled is not None:
        replicas, decisions = carry_scale_to_model(api, body, job, scaled)
        job = job.model_copy(update={"replicas": replicas})
    # One LIST instead of a create-then-read per rank: a RoleGroup may have many EngineInstances.
    existing = {t["metadata"]["name"]: t
                for t in api.list(kube.ENGINE_INSTANCE, namespace, {naming.LABEL_JOB: name})}
    for rank in range(job.replicas):
        task = build_task(name, namespace, job, rank)
        kopf.adopt(task, owner=as_body(body))
        outcome = api.apply_known(task, existing.get(task["metadata"]["name"]))
        if outcome != "unchanged":
            decisions.append(applied(naming.KIND_ENGINE_INSTANCE, task["metadata"]["name"],
                                     outcome))
    surplus = [
        task for task in existing.values()
        if kube.controller_uid(task) == meta["uid"]
        and int(task["spec"].get("rank", 0)) >= job.replicas
    ]
    for task in sorted(surplus, key=lambda t: -int(t["spec"].get("rank", 0))):
        if api.delete(kube.ENGINE_INSTANCE, namespace, task["metadata"]["name"]):
            decisions.append(Decision(
                "ScaledDown", f"EngineInstance {task['metadata']['name']} deleted: rank"
                f" {task['spec'].get('rank')} >= replicas {job.replicas}"))
    api.patch_status(kube.ROLE_GROUP, namespace, name,
                     {"observedGeneration": meta.get("generation")})
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
        raise OwnershipConflict(f"Pod {name} exists but is not controlled by EngineInstance {name}")
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
    """Mirror a Pod event into its EngineInstance's status; recreate the Pod if it is gone. Returns
    the
    EngineInstance (None if it is gone too) and the decisions made. A claimed warm Pod has no DNS
    name
    under the headless Service (hostname and subdomain are fixed at creation), so its
    EngineInstance's endpoint is the Pod IP."""
    namespace = pod["metadata"]["namespace"]
    task_name = (pod["metadata"].get("labels") or {}).get(naming.LABEL_TASK)
    task_body = api.get(kube.ENGINE_INSTANCE, namespace, task_name) if task_name else None
    if task_body is None or not _is_live(task_body):
        return None, []  # the EngineInstance is gone or going: the GC owns the Pod now
    if kube.controller_uid(pod) != task_body["metadata"]["uid"]:
        return task_body, []  # a Pod of an older EngineInstance with the same name
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
        api.patch_status(kube.ENGINE_INSTANCE, namespace, task_body["metadata"]["name"], new)
    decisions: list[Decision] = []
    if previous.get("phase") != new["phase"]:
        failed = new["phase"] == status.PHASE_FAILED
        decisions.append(Decision(f"Phase{new['phase']}", f"{new['reason']}: {new['message']}",
                                  "Warning" if failed else "Normal"))
    if gone:
        decisions += apply_task(api, settings, task_body, claims)
    return task_body, decisions


def refresh_job_status(api: KubeApi, namespace: str, name: str) -> None:
    job = api.get(kube.ROLE_GROUP, namespace, name)
    if not _is_live(job):
        return
    assert job is not None
    previous: Mapping[str, Any] = job.get("status") or {}
    replicas = int(job["spec"].get("replicas", 0))
    tasks = [t for t in api.list(kube.ENGINE_INSTANCE, namespace, {naming.LABEL_JOB: name})
             if kube.controller_uid(t) == job["metadata"]["uid"]]
    new = status.job_status(status.count_tasks(replicas, tasks),
                            role=str(job["spec"].get("role")),
                            generation=job["metadata"].get("generation"), previous=previous,
                            now=status.now_iso(), selector=f"{naming.LABEL_JOB}={name}")
    if status.changed(previous, new):
        api.patch_status(kube.ROLE_GROUP, namespace, name, new)
