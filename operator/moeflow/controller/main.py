"""kopf registrations, and nothing else: each handler delegates to a reconcile module.

Run with `moeflow operator` (see `cli.py`) or `kopf run -m moeflow.controller.main`.

Flow (each arrow is a watch event that triggers the next level, level-based and idempotent):
    Model  --create/update/resume-->  RoleGroups, gateway Deployment/Services/RBAC
                                      (attention/expert: balancer Deployment/RBAC)
    RoleGroup       --create/update/resume-->  EngineInstances (ranks 0..replicas-1)
    RoleGroup scale (`kubectl scale`, HPA, KEDA: spec.replicas) --> Model spec.roles.<role>
    EngineInstance  --create/update/resume-->  Pod
    Pod --event--> EngineInstance status --event--> RoleGroup status --event--> Model status
    Deployment (gateway) --event-->  Model status
    Request --daemon while unfinished-->  batch fan-out, results ConfigMap
    Model with maxReplicas --one loop, every autoscale_interval_s-->  spec.roles.<role>.replicas
    WarmPool --create/update/resume-->  worker Pods   Pod --event-->  WarmPool (refill, status)
    EngineInstance needing a Pod --claims--> an idle warm Pod that fits (relabel, re-own, claim)
    FineTune --create/resume/event-->  trainer RBAC + Pod   Pod --event-->  FineTune status
Status refreshes of one object are coalesced (`Coalescer`): bursts of child events cost one
read-compute-write of the parent at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf

from moeflow.controller import reconcile_finetune
from moeflow.controller.autoscale import has_bounds
from moeflow.controller.context import MEMO_KEY, WARM_CLAIMS_KEY, OperatorContext, context_of
from moeflow.controller.events import Decision, post
from moeflow.controller.reconcile_autoscale import Memory, autoscale_model
from moeflow.controller.reconcile_engine import (
    apply_job,
    apply_task,
    refresh_job_status,
    sync_task_with_pod,
)
from moeflow.controller.reconcile_model import apply_model, record_error, refresh_model_status
from moeflow.controller.reconcile_request import is_unfinished, run_request
from moeflow.controller.reconcile_warm_pool import apply_warm_pool
from moeflow.controller.settings import OperatorSettings
from moeflow.domain import finetune_spec, naming
from moeflow.domain.spec import SpecError
from moeflow.kube.api import KubeApi, OwnershipConflict

MODELS = (naming.GROUP, naming.VERSION, "models")
ROLE_GROUPS = (naming.GROUP, naming.VERSION, "rolegroups")
ENGINE_INSTANCES = (naming.GROUP, naming.VERSION, "engineinstances")
REQUESTS = (naming.GROUP, naming.VERSION, "requests")
WARM_POOLS = (naming.GROUP, naming.VERSION, "warmpools")
FINETUNES = (naming.GROUP, naming.VERSION, finetune_spec.PLURAL)
logger = logging.getLogger(__name__)
ENGINE_PODS = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
               naming.LABEL_COMPONENT: naming.COMPONENT_ENGINE}
GATEWAYS = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
            naming.LABEL_COMPONENT: naming.COMPONENT_GATEWAY}
# Claimed warm Pods included (they keep the pool label): a claim's relabel event refills the pool.
WARM_PODS: dict[str, Any] = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
                             naming.LABEL_WARM_POOL: kopf.PRESENT}
TRAINER_PODS = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
                naming.LABEL_COMPONENT: finetune_spec.COMPONENT}


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    op_settings = OperatorSettings()
    # Progress and diff-base in annotations only: the CRD status schemas are closed, and a
    # status.kopf field would be pruned by the API server.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=naming.GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{naming.GROUP}/finalizer"
    settings.posting.reporting_component = naming.MANAGED_BY
    settings.execution.default_backoff = op_settings.retry_backoff_s
    memo[MEMO_KEY] = OperatorContext(op_settings, KubeApi.from_config(op_settings.kubeconfig),
                                     warm_claims=memo.get(WARM_CLAIMS_KEY))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if MEMO_KEY in memo:
        await context_of(memo).stop_background()
        context_of(memo).close()


def _namespaced(namespace: str | None) -> str:
    if namespace is None:  # every moeflow.dev kind is namespaced; kopf types allow None
        raise kopf.PermanentError("moeflow.dev resources are namespaced")
    return namespace


async def _refresh_model(ctx: OperatorContext, namespace: str, name: str) -> None:
    await ctx.refreshes.run(("model", namespace, name), lambda: ctx.call(
        refresh_model_status, ctx.api, ctx.settings, namespace, name))


async def _refresh_job(ctx: OperatorContext, namespace: str, name: str) -> None:
    await ctx.refreshes.run(("job", namespace, name), lambda: ctx.call(
        refresh_job_status, ctx.api, namespace, name))


@kopf.on.resume(*MODELS)
@kopf.on.create(*MODELS)
@kopf.on.update(*MODELS)
async def reconcile_model(body: kopf.Body, memo: kopf.Memo, namespace: str | None,
                          name: str, **_: Any) -> None:
    ctx, namespace = context_of(memo), _namespaced(namespace)
    try:
        decisions = await ctx.call(apply_model, ctx.api, ctx.settings, body)
    except SpecError as e:
        post(body, [Decision("InvalidSpec", str(e), "Warning")])
        await _refresh_model(ctx, namespace, name)
        raise kopf.PermanentError(str(e)) from None
    except OwnershipConflict as e:
        await ctx.call(record_error, ctx.api, body, "NameConflict", str(e))
        post(body, [Decision("NameConflict", str(e), "Warning")])
        await _refresh_model(ctx, namespace, name)
        raise kopf.TemporaryError(str(e), delay=30) from None
    post(body, decisions)
    await _refresh_model(ctx, namespace, name)


@kopf.on.event(*ROLE_GROUPS)
async def job_changed(body: kopf.Body, memo: kopf.Memo, namespace: str | None,
                      **_: Any) -> None:
    model = body.get("spec", {}).get("model")
    if model:
        await _refresh_model(context_of(memo), _namespaced(namespace), model)


@kopf.on.event("apps", "v1", "deployments", labels=GATEWAYS)
async def gateway_changed(body: kopf.Body, memo: kopf.Memo, namespace: str | None,
                          **_: Any) -> None:
    model = body["metadata"].get("labels", {}).get(naming.LABEL_MODEL)
    if model:
        await _refresh_model(context_of(memo), _namespaced(namespace), model)


@kopf.on.resume(*ROLE_GROUPS)
@kopf.on.create(*ROLE_GROUPS)
@kopf.on.update(*ROLE_GROUPS)
async def reconcile_job(body: kopf.Body, memo: kopf.Memo, namespace: str | None, name: str,
                        **_: Any) -> None:
    ctx, namespace = context_of(memo), _namespaced(namespace)
    try:
        decisions = await ctx.call(apply_job, ctx.api, body)
    except (SpecError, OwnershipConflict) as e:
        post(body, [Decision(type(e).__name__, str(e), "Warning")])
        raise kopf.PermanentError(str(e)) from None
    post(body, decisions)
    await _refresh_job(ctx, namespace, name)


@kopf.on.event(*ENGINE_INSTANCES)
async def task_changed(body: kopf.Body, memo: kopf.Memo, namespace: str | None,
                       **_: Any) -> None:
    job = body.get("spec", {}).get("roleGroup")
    if job:
        await _refresh_job(context_of(memo), _namespaced(namespace), job)


@kopf.on.resume(*ENGINE_INSTANCES)
@kopf.on.create(*ENGINE_INSTANCES)
@kopf.on.update(*ENGINE_INSTANCES)
async def reconcile_task(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    ctx = context_of(memo)
    try:
        decisions = await ctx.call(apply_task, ctx.api, ctx.settings, body, ctx.warm_claims)
    except (SpecError, OwnershipConflict) as e:
        post(body, [Decision(type(e).__name__, str(e), "Warning")])
        raise kopf.PermanentError(str(e)) from None
    post(body, decisions)


@kopf.on.event("", "v1", "pods", labels=ENGINE_PODS)
async def pod_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo,
                      **_: Any) -> None:
    ctx = context_of(memo)
    task, decisions = await ctx.call(sync_task_with_pod, ctx.api, ctx.settings,
                                     event.get("type"), body, ctx.warm_claims)
    if task is not None:
        post(task, decisions)


@kopf.daemon(*REQUESTS, when=is_unfinished, cancellation_timeout=1.0)
async def request_daemon(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                         logger: logging.Logger | logging.LoggerAdapter[Any],
                         **_: Any) -> None:
    await run_request(context_of(memo), body, stopped, logger)


@kopf.on.event(*MODELS)
async def model_seen(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo,
                     namespace: str | None, name: str, **_: Any) -> None:
    """Keep the autoscaler's list of Models with bounds (kopf's own watch, so only served
    namespaces)."""
    ctx, key = context_of(memo), (_namespaced(namespace), name)
    if event.get("type") != "DELETED" and has_bounds(body.get("spec") or {}):
        ctx.autoscaled.add(key)
        if not ctx.background:
            # Started here, not at startup: it inherits the context kopf's Event posting needs.
            ctx.background.append(asyncio.create_task(_autoscale_forever(ctx),
                                                      name="autoscaler"))
    else:
        ctx.autoscaled.discard(key)


# One loop for every autoscaled Model, not a per-Model @kopf.timer or daemon: kopf puts a
# finalizer on every object with a timer or daemon, and Models deliberately have none
# (deleting one must not wait for the operator). The interval comes from the settings, which
# a timer's decorator could not read either.
async def _autoscale_forever(ctx: OperatorContext) -> None:
    assert ctx.engine_stats is not None
    memories: dict[tuple[str, str], Memory] = {}

    async def one(key: tuple[str, str]) -> None:
        namespace, name = key
        try:
            memory, decisions, model = await ctx.call(
                autoscale_model, ctx.api, ctx.engine_stats, namespace, name,
                memories.get(key, {}), time.monotonic())
        except Exception:  # an API hiccup: this round is lost, the next one retries
            logger.exception("autoscaler round of %s/%s failed", namespace, name)
            return
        memories[key] = memory
        if model is not None:
            post(model, decisions)

    while True:
        keys = sorted(ctx.autoscaled)
        for gone in set(memories) - set(keys):
            del memories[gone]
        await asyncio.gather(*(one(key) for key in keys))
        await asyncio.sleep(ctx.settings.autoscale_interval_s)


async def _reconcile_warm_pool(ctx: OperatorContext, namespace: str, name: str) -> None:
    async def run() -> None:
        pool, decisions = await ctx.call(apply_warm_pool, ctx.api, ctx.settings, namespace, name)
        if pool is not None:
            post(pool, decisions)

    await ctx.refreshes.run(("warmpool", namespace, name), run)


@kopf.on.resume(*WARM_POOLS)
@kopf.on.create(*WARM_POOLS)
@kopf.on.update(*WARM_POOLS)
async def reconcile_warm_pool(memo: kopf.Memo, namespace: str | None, name: str,
                              **_: Any) -> None:
    await _reconcile_warm_pool(context_of(memo), _namespaced(namespace), name)


@kopf.on.event("", "v1", "pods", labels=WARM_PODS)
async def warm_pod_changed(body: kopf.Body, memo: kopf.Memo, namespace: str | None,
                           **_: Any) -> None:
    pool = (body["metadata"].get("labels") or {}).get(naming.LABEL_WARM_POOL)
    if pool:
        await _reconcile_warm_pool(context_of(memo), _namespaced(namespace), pool)


@kopf.on.resume(*FINETUNES)
@kopf.on.create(*FINETUNES)
async def start_finetune(memo: kopf.Memo, namespace: str | None, name: str, **_: Any) -> None:
    await reconcile_finetune.start(context_of(memo), _namespaced(namespace), name)


@kopf.on.event(*FINETUNES)
async def finetune_changed(event: kopf.RawEvent, memo: kopf.Memo, namespace: str | None,
                           name: str, **_: Any) -> None:
    """The trainer's progress reports arrive as status patches: milestones become Events."""
    if event.get("type") != "DELETED":
        await reconcile_finetune.refresh(context_of(memo), _namespaced(namespace), name)


@kopf.on.event("", "v1", "pods", labels=TRAINER_PODS)
async def trainer_pod_changed(body: kopf.Body, memo: kopf.Memo, namespace: str | None,
                              **_: Any) -> None:
    finetune = (body["metadata"].get("labels") or {}).get(finetune_spec.LABEL_FINETUNE)
    if finetune:
        await reconcile_finetune.refresh(context_of(memo), _namespaced(namespace), finetune)
