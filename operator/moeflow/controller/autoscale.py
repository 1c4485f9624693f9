"""The cluster autoscaler's bookkeeping around the shared policy. Pure; no I/O, no kopf.

The policy itself (``moeflow.domain.autoscale.decide``) is shared with the local scaler; this
module turns what the operator sees of one role (its EngineInstances, their engines' ``/v1/stats``)
into
a ``RoleObservation``, remembers what the policy needs across rounds (``RoleMemory``), and
says how a decision is written down.

- **Which roles.** A role is autoscaled when its ``maxReplicas`` is set; ``minReplicas``
  defaults to 0, so without a maximum there are no bounds to scale within.
- **Where the decision goes.** ``spec.roles.<role>.replicas`` of the Model, by a merge patch
  that carries the Model's ``resourceVersion`` (a lost race is retried the next round). The
  operator already turns that field into RoleGroups, EngineInstances and Pods, ``kubectl get``
  shows it, the
  generation moves (so ``Progressing`` reports the scale in flight), and the gateway's scale
  from zero writes the same field. The policy clamps to ``[minReplicas, maxReplicas]``, so the
  CRD's CEL rules always hold. As with an HPA and ``Deployment.spec.replicas``, GitOps tools
  must ignore that field on autoscaled roles.
- **Activity.** A round is active when an engine runs or queues a request, when an engine's
  prompt-token counter moved since the last round, or while a replica is still starting (a
  replica the gateway just woke must get its first request before the idle window counts).
  Someone else changing ``replicas`` (a user, the gateway) counts as a scale event and as
  activity, so the cooldowns and the idle window start again.
- **Memory** is per operator process (the daemon's loop holds it). A restarted operator starts
  every role as just scaled and just active: it waits a cooldown and a whole idle window before
  it scales anything down, never less.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moeflow.domain.autoscale import Decision, RoleObservation, queue_growth_per_s
from moeflow.domain.messages import EngineStats
from moeflow.domain.roles import Role
from moeflow.domain.spec import ModelSpec


def autoscaled_roles(spec: ModelSpec) -> tuple[Role, ...]:
    """The roles of the mode that have autoscaling bounds (``maxReplicas`` set)."""
    return tuple(r for r in spec.role_names if spec.role(r).max_replicas is not None)


def has_bounds(raw_spec: Mapping[str, Any]) -> bool:
    """Whether a raw Model spec has any role with ``maxReplicas`` (kopf's `when` filter)."""
    roles = raw_spec.get("roles") or {}
    return any(isinstance(r, Mapping) and r.get("maxReplicas") is not None
               for r in roles.values())


@dataclass(frozen=True)
class Engine:
    """A ready engine of the role: the EngineInstance's name and where its Pod answers."""

    task: str
    host: str
    port: int


@dataclass(frozen=True)
class RoleTasks:
    """What the EngineInstance objects of a role say, for ranks below ``replicas``."""

    ready: tuple[Engine, ...]
    num_starting: int
    cold_starts_s: tuple[float, ...]


def read_tasks(tasks: Iterable[Mapping[str, Any]], replicas: int) -> RoleTasks:
    ready: list[Engine] = []
    num_starting = 0
    cold_starts: list[float] = []
    for task in tasks:
        if task.get("metadata", {}).get("deletionTimestamp"):
            continue
        spec, status = task.get("spec") or {}, task.get("status") or {}
        if int(spec.get("rank", replicas)) >= replicas:
            continue
        measured = (status.get("coldStart") or {}).get("podReadySeconds")
        if isinstance(measured, int | float):
            cold_starts.append(float(measured))
        pod_ip = status.get("podIP")
        if status.get("ready") and pod_ip:
            port = int((spec.get("template") or {}).get("port", 8001))
            ready.append(Engine(task["metadata"]["name"], str(pod_ip), port))
        else:
            num_starting += 1
    return RoleTasks(tuple(sorted(ready, key=lambda e: e.task)), num_starting,
                     tuple(cold_starts))


@dataclass(frozen=True)
class RoleMemory:
    """What one role's previous rounds left for the next (monotonic seconds)."""

    replicas: int
    last_active_s: float
    last_scale_s: float
    observed_at_s: float
    num_waiting: int = 0
    prompt_tokens: Mapping[str, int] = field(default_factory=dict)
    """Per engine instance id: its ``num_prompt_tokens_total`` last round."""
    cold_start_s: float = 0.0
    """The last measured cold start, kept while the role is at zero."""


def first_memory(replicas: int, now_s: float) -> RoleMemory:
    """A role seen for the first time: as if just scaled and just active (conservative)."""
    return RoleMemory(replicas=replicas, last_active_s=now_s, last_scale_s=now_s,
                      observed_at_s=now_s)


def observe(memory: RoleMemory, *, replicas: int, tasks: RoleTasks,
            stats: Sequence[EngineStats], now_s: float) -> tuple[RoleObservation, RoleMemory]:
    """This round's observation of a role, and the memory for the next round.

    ``stats`` are the answers of ``tasks.ready``; a ready engine without an answer (down,
    slow, or refusing) counts as unobserved and as active: silence is not idleness."""
    last_scale, last_active = memory.last_scale_s, memory.last_active_s
    if replicas != memory.replicas:  # someone else scaled it (a user, the gateway)
        last_scale = last_active = now_s
    counters = {s.instance_id: s.num_prompt_tokens_total for s in stats}
    moved = any(memory.prompt_tokens.get(i, total) != total for i, total in counters.items())
    busy = any(s.num_running + s.num_waiting > 0 for s in stats)
    num_unobserved = max(0, len(tasks.ready) - len(stats))
    if moved or busy or tasks.num_starting > 0 or num_unobserved > 0:
        last_active = now_s
    num_waiting = sum(s.num_waiting for s in stats)
    cold_start = max(tasks.cold_starts_s) if tasks.cold_starts_s else memory.cold_start_s
    observation = RoleObservation(
        current_replicas=replicas,
        stats=tuple(stats),
        waiting_growth_per_s=queue_growth_per_s(memory.num_waiting, num_waiting,
                                                now_s - memory.observed_at_s),
        cold_start_s=cold_start,
        seconds_since_last_request=max(0.0, now_s - last_active),
        seconds_since_last_scale=max(0.0, now_s - last_scale),
        num_unobserved=num_unobserved,
    )
    return observation, RoleMemory(
        replicas=replicas, last_active_s=last_active, last_scale_s=last_scale,
        observed_at_s=now_s, num_waiting=num_waiting, prompt_tokens=counters,
        cold_start_s=cold_start)


def after_scale(memory: RoleMemory, desired: int, now_s: float) -> RoleMemory:
    return dataclasses.replace(memory, replicas=desired, last_scale_s=now_s)


def event_reason(decision: Decision) -> str:
    """Event reason of a scaling decision: AutoscaleUp, AutoscaleDown, AutoscaleIdle, ..."""
    return f"Autoscale{decision.action.capitalize()}"


def decision_status(decisions: Mapping[Role, Decision], *, now: str,
                    scaled: bool) -> dict[str, Any]:
    """The Model status fields of one round: the decision per role, and ``lastScaleTime``
    when some role's replicas were changed."""
    result: dict[str, Any] = {"autoscaling": {
        role.value: {"desired": d.desired_replicas, "action": d.action,
                     "reason": d.reason[:256], "decidedAt": now}
        for role, d in decisions.items()}}
    if scaled:
        result["lastScaleTime"] = now
    return result


def status_changed(previous: Mapping[str, Any], decisions: Mapping[Role, Decision]) -> bool:
    """Whether a round's decisions differ from the recorded ones (desired or action); reasons
    alone ("steady: load 3 on 2 replicas") change every round and are not worth a write."""
    recorded = previous.get("autoscaling") or {}
    return any(
        (recorded.get(role.value) or {}).get("desired") != d.desired_replicas
        or (recorded.get(role.value) or {}).get("action") != d.action
        for role, d in decisions.items())
