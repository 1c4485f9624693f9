"""Pure status computation: Pod -> EngineInstance status, EngineInstances -> RoleGroup status,
RoleGroups -> Model status.

Contract: each function is a function of what it is given (observed children, the previous
status, the time), so the status is level-based; recomputing it from the same cluster state
gives the same dict. Conditions follow metav1.Condition (type, status, reason, message,
lastTransitionTime, observedGeneration); lastTransitionTime moves only when status flips, so
an unchanged world produces an unchanged status and no write.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

Obj = dict[str, Any]

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"
PHASE_PENDING, PHASE_STARTING, PHASE_READY, PHASE_FAILED = "Pending", "Starting", "Ready", "Failed"

# Container waiting reasons that will not heal by waiting.
_FATAL_WAITING = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                  "CreateContainerConfigError", "CreateContainerError"}


def now_iso() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def condition(type_: str, is_true: bool, reason: str, message: str, *,
              previous: Sequence[Mapping[str, Any]], now: str,
              observed_generation: int | None = None) -> Obj:
    status = "True" if is_true else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    since = before.get("lastTransitionTime") if before and before.get("status") == status else None
    result: Obj = {"type": type_, "status": status, "reason": reason, "message": message,
                   "lastTransitionTime": since or now}
    if observed_generation is not None:
        result["observedGeneration"] = observed_generation
    return result


def _pod_condition(pod: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cast(Mapping[str, Any], cond)
    return None


def _phase_of_pod(pod: Mapping[str, Any] | None) -> tuple[str, str, str]:
    """(phase, reason, message) of an EngineInstance given its Pod."""
    if pod is None:
        return PHASE_PENDING, "PodMissing", "the Pod does not exist (yet)"
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return PHASE_PENDING, "PodTerminating", "the Pod is being deleted"
    status = pod.get("status", {})
    if status.get("phase") in ("Failed", "Succeeded"):
        return PHASE_FAILED, status.get("reason") or "PodExited", status.get("message") or (
            f"the Pod is {status['phase']}; engines are not expected to exit")
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _FATAL_WAITING:
            return PHASE_FAILED, waiting["reason"], waiting.get("message") or waiting["reason"]
    ready = _pod_condition(pod, "Ready")
    if ready is not None and ready.get("status") == "True":
        return PHASE_READY, "HealthCheckPassed", "GET /health answers"
    if status.get("phase") == "Running":
        return PHASE_STARTING, "WaitingForHealth", "the engine is loading; /health not ready"
    scheduled = _pod_condition(pod, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        return PHASE_PENDING, scheduled.get("reason") or "Unschedulable", scheduled.get(
            "message", "")
    return PHASE_PENDING, "PodPending", "waiting for the Pod to be scheduled and started"


def task_status(pod: Mapping[str, Any] | None, *, endpoint: str,
                previous: Mapping[str, Any], now: str,
                engine_cold_start: Mapping[str, float] | None = None,
                warm_pool: str | None = None, claimed_at: str | None = None) -> Obj:
    """`warm_pool`/`claimed_at`: the Pod was claimed from that WarmPool at that time
    (coldStart says `path: warm-pool`, and podReadySeconds counts from the claim)."""
    phase, reason, message = _phase_of_pod(pod)
    result: Obj = {"phase": phase, "ready": phase == PHASE_READY, "endpoint": endpoint,
                   "reason": reason, "message": message}
    if pod is not None:
        result["podName"] = pod["metadata"]["name"]
        for src, dst in (("podIP", "podIP"), ("hostIP", "hostIP")):
            if pod.get("status", {}).get(src):
                result[dst] = pod["status"][src]
        if pod.get("spec", {}).get("nodeName"):
            result["nodeName"] = pod["spec"]["nodeName"]
        ready = _pod_condition(pod, "Ready")
        created = _parse_time(claimed_at or pod["metadata"].get("creationTimestamp"))
        ready_at = _parse_time(ready.get("lastTransitionTime")) if ready else None
        if warm_pool:
            result["coldStart"] = {**(previous.get("coldStart") or {}), "path": "warm-pool",
                                   "warmPool": warm_pool}
        if phase == PHASE_READY and created and ready_at:
            # First of the five cold-start steps; the engine reports the other four.
            cold_start = dict(result.get("coldStart") or previous.get("coldStart") or {})
            cold_start["podReadySeconds"] = max(0.0, (ready_at - created).total_seconds())
            cold_start.update(engine_cold_start or {})  # engine_report.fetch_cold_start
            result["coldStart"] = cold_start
    result["conditions"] = [condition(READY, phase == PHASE_READY, reason, message,
                                      previous=previous.get("conditions") or [], now=now)]
    return result


@dataclass(frozen=True)
class Counts:
    desired: int
    ready: int
    failed: int = 0

    @property
    def summary(self) -> str:
        return f"{self.ready}/{self.desired}"


def count_tasks(replicas: int, tasks: Iterable[Mapping[str, Any]]) -> Counts:
    """Ready and failed EngineInstances among ranks 0..replicas-1 (higher ranks are on their way
    out)."""
    ready = failed = 0
    for task in tasks:
        if task.get("metadata", {}).get("deletionTimestamp"):
            continue
        if int(task.get("spec", {}).get("rank", replicas)) >= replicas:
            continue
        phase = (task.get("status") or {}).get("phase")
        ready += phase == PHASE_READY
        failed += phase == PHASE_FAILED
    return Counts(desired=replicas, ready=ready, failed=failed)


def _three_conditions(counts: Mapping[str, Counts], *, generation: int | None,
                      observed_generation: int | None, previous: Sequence[Mapping[str, Any]],
                      now: str) -> list[Obj]:
    summary = ", ".join(f"{name} {c.summary}" for name, c in counts.items())
    desired = sum(c.desired for c in counts.values())
    all_ready = all(c.ready >= c.desired for c in counts.values())
    up_to_date = generation is None or observed_generation == generation
    failing = {name: c.failed for name, c in counts.items() if c.failed}
    if desired == 0:
        ready = condition(READY, False, "ScaledToZero", "no replicas are desired",
                          previous=previous, now=now, observed_generation=observed_generation)
    else:
        ready = condition(READY, all_ready and up_to_date,
                          "AllReplicasReady" if all_ready else "ReplicasNotReady", summary,
                          previous=previous, now=now, observed_generation=observed_generation)
    if not up_to_date:
        progressing = condition(PROGRESSING, True, "Reconciling",
                                f"generation {generation} is not applied yet",
                                previous=previous, now=now, observed_generation=observed_generation)
    else:
        progressing = condition(PROGRESSING, not all_ready,
                                "WaitingForReplicas" if not all_ready else "Stable", summary,
                                previous=previous, now=now, observed_generation=observed_generation)
    degraded = condition(
        DEGRADED, bool(failing), "InstancesFailing" if failing else "AsExpected",
        ", ".join(f"{n}: {f} failing" for n, f in failing.items()) or "no instance is failing",
        previous=previous, now=now, observed_generation=observed_generation)
    return [ready, progressing, degraded]


def job_status(counts: Counts, *, role: str, generation: int | None,
               previous: Mapping[str, Any], now: str, selector: str | None = None) -> Obj:
    """RoleGroup status. `selector`: the label selector of the group's Pods, which the scale
    subresource publishes (labelSelectorPath) for HPA and KEDA."""
    observed = previous.get("observedGeneration")
    return {
        **({"selector": selector} if selector else {}),
        "replicas": counts.desired, "readyReplicas": counts.ready,
        "failedReplicas": counts.failed, "summary": counts.summary,
        "conditions": _three_conditions({role: counts}, generation=generation,
                                        observed_generation=observed,
                                        previous=previous.get("conditions") or [], now=now),
    }


def warm_pool_status(counts: Counts, *, generation: int | None, previous: Mapping[str, Any],
                     now: str) -> Obj:
    """WarmPool status: desired/ready worker Pods and the three conditions. The CRD's status
    has no observedGeneration, so the conditions carry it."""
    return {
        "desired": counts.desired, "ready": counts.ready,
        "conditions": _three_conditions({"warm": counts}, generation=None,
                                        observed_generation=generation,
                                        previous=previous.get("conditions") or [], now=now),
    }


def model_status(roles: Mapping[str, Counts], gateway: Counts, *, endpoint: str,
                 generation: int | None, previous: Mapping[str, Any], now: str) -> Obj:
    counts = {**roles, "gateway": gateway}
    # A merge patch keeps map keys it does not mention: null out roles the mode no longer has.
    stale: dict[str, Any] = {
        name: None for name in previous.get("roles") or {} if name not in roles}
    return {
        "endpoint": endpoint,
        "roles": stale | {name: {"desired": c.desired, "ready": c.ready, "failed": c.failed}
                          for name, c in roles.items()},
        "gateway": {"desired": gateway.desired, "ready": gateway.ready},
        "readySummary": ", ".join(f"{name} {c.summary}" for name, c in counts.items()),
        "conditions": _three_conditions(counts, generation=generation,
                                        observed_generation=previous.get("observedGeneration"),
                                        previous=previous.get("conditions") or [], now=now),
    }


def invalid_status(message: str, *, reason: str, previous: Mapping[str, Any], now: str) -> Obj:
    """Status of an object whose spec cannot be acted on (Degraded, not Ready, not moving)."""
    before = previous.get("conditions") or []
    return {"conditions": [
        condition(READY, False, reason, message, previous=before, now=now),
        condition(PROGRESSING, False, reason, message, previous=before, now=now),
        condition(DEGRADED, True, reason, message, previous=before, now=now),
    ]}


def batch_conditions(message: str, *, num_failed: int, total: int, is_done: bool) -> list[Obj]:
    """Conditions of a batch Request: Progressing while it runs, Ready once every prompt has a
    result, Degraded when some prompts failed."""
    now = now_iso()
    reason = "Completed" if is_done else "Running"
    return [
        condition(READY, is_done, reason, message, previous=[], now=now),
        condition(PROGRESSING, not is_done, reason, message, previous=[], now=now),
        condition(DEGRADED, num_failed > 0, "ItemsFailed" if num_failed else "AsExpected",
                  f"{num_failed} of {total} prompts failed", previous=[], now=now),
    ]


def changed(previous: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether writing `new` over `previous` (a merge patch) would change anything."""
    return any(previous.get(k) != v for k, v in new.items())
