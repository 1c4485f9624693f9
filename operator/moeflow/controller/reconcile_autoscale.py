"""One round of the cluster autoscaler for one Model (blocking; run on the handler thread pool
by `main.autoscaler`, a kopf daemon per autoscaled Model, every `autoscale_interval_s`).

Read the Model (and its internal token, which engines require on `/v1/stats`), then for each
autoscaled role: its EngineInstances, the `/v1/stats` of its ready engines
(concurrently, each bounded by the stats client's timeout), `autoscale.observe`, the shared
policy. Changed counts go into `spec.roles.<role>.replicas` in one merge patch locked on the
Model's resourceVersion; the operator's update handler then scales the RoleGroups and
EngineInstances as for a
human edit. Each change is an Event; the decisions are in `status.autoscaling`, and
`status.lastScaleTime` moves when replicas change. See `autoscale` for the choices.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from moeflow.controller import autoscale, status
from moeflow.controller.build_security import token_of
from moeflow.controller.engine_report import EngineStatsClient
from moeflow.controller.events import Decision
from moeflow.domain import naming
from moeflow.domain.autoscale import Decision as ScaleDecision
from moeflow.domain.autoscale import ScalePolicy, decide, replicas_patch
from moeflow.domain.messages import EngineStats
from moeflow.domain.roles import Role
from moeflow.domain.spec import SpecError, parse_model_spec
from moeflow.kube import api as kube
from moeflow.kube.api import Conflict, KubeApi

logger = logging.getLogger(__name__)

Memory = dict[Role, autoscale.RoleMemory]
_MAX_PARALLEL_STATS = 8


def _stats(client: EngineStatsClient, engines: tuple[autoscale.Engine, ...],
           token: str | None) -> list[EngineStats]:
    if not engines:
        return []
    with ThreadPoolExecutor(min(_MAX_PARALLEL_STATS, len(engines))) as pool:
        answers = list(pool.map(lambda e: client.stats(e.host, e.port, token), engines))
    return [a for a in answers if a is not None]


def autoscale_model(api: KubeApi, stats_client: EngineStatsClient, namespace: str, name: str,
                    memory: Memory, now_s: float
                    ) -> tuple[Memory, list[Decision], Mapping[str, Any] | None]:
    """One round. Returns the memory for the next round, the Events to post and the Model
    they are about (None: the Model is gone, being deleted, or its spec is invalid)."""
    model = api.get(kube.MODEL, namespace, name)
    if model is None or model["metadata"].get("deletionTimestamp"):
        return memory, [], None
    try:
        spec = parse_model_spec(model.get("spec"))
    except SpecError:
        return memory, [], None  # the update handler reports it
    next_memory: Memory = {}
    decisions: dict[Role, ScaleDecision] = {}
    token = token_of(api.get(kube.SECRET, namespace, naming.internal_token_secret_name(name)))
    for role in autoscale.autoscaled_roles(spec):
        replicas = spec.role(role).replicas
        tasks = autoscale.read_tasks(api.list(kube.ENGINE_INSTANCE, namespace, {
            naming.LABEL_MODEL: name, naming.LABEL_ROLE: role.value}), replicas)
        previous = memory.get(role) or autoscale.first_memory(replicas, now_s)
        observation, next_memory[role] = autoscale.observe(
            previous, replicas=replicas, tasks=tasks,
            stats=_stats(stats_client, tasks.ready, token), now_s=now_s)
        decisions[role] = decide(observation, ScalePolicy.for_role(spec, role))
    changes = {role: d.desired_replicas for role, d in decisions.items()
               if d.desired_replicas != spec.role(role).replicas}
    events: list[Decision] = []
    if changes:
        patch = replicas_patch(changes, model["metadata"].get("resourceVersion"))
        try:
            api.patch(kube.MODEL, namespace, name, patch)
        except Conflict as e:
            logger.info("autoscaler: %s/%s moved meanwhile, next round: %s", namespace, name, e)
            return memory, [], None
        for role, desired in changes.items():
            next_memory[role] = autoscale.after_scale(next_memory[role], desired, now_s)
            decision = decisions[role]
            events.append(Decision(
                autoscale.event_reason(decision),
                f"{role.value}: {spec.role(role).replicas} -> {desired} replicas;"
                f" {decision.reason}"))
    previous_status: Mapping[str, Any] = model.get("status") or {}
    if changes or autoscale.status_changed(previous_status, decisions):
        api.patch_status(kube.MODEL, namespace, name, autoscale.decision_status(
            decisions, now=status.now_iso(), scaled=bool(changes)))
    return next_memory, events, model
