"""FineTune reconciliation: one level-based refresh per FineTune (blocking; run on the handler
thread pool and coalesced per object by `main`).

`refresh_finetune` reads the FineTune and its current attempt's Pod and moves the world one
step toward done (`build_finetune.observe` decides; this module only does the I/O):
- no Pod yet: check a ConfigMap dataset (missing: wait, and say so; invalid JSONL: Failed
  at once, no Pod), then apply the trainer's ServiceAccount/Role/RoleBinding and create the
  Pod `<name>-finetune-<attempt>`;
- the Pod runs, succeeds or fails: phase, conditions and Events follow; a failure that may
  heal creates the next attempt's Pod (it resumes from the newest checkpoint);
- progress (written by the trainer into `status.progress`) passing a quarter of the run
  posts a `Progress` Event.
Triggers (see `main`): the FineTune's create/resume (retried while it waits), any watch event
of the FineTune (the trainer's progress patches included) and of its Pods. Names are
deterministic, so replays and operator restarts create no twins; nothing here adds a
finalizer (deleting a FineTune is the garbage collector's job: Pods and RBAC are owned).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from moeflow.controller import build_finetune as build
from moeflow.controller.context import OperatorContext
from moeflow.controller.events import Decision, as_body, post
from moeflow.controller.settings import OperatorSettings
from moeflow.controller.status import changed, now_iso
from moeflow.domain import finetune_spec as ft
from moeflow.domain import naming
from moeflow.domain.finetune_data import DatasetError, parse_records
from moeflow.domain.spec import SpecError
from moeflow.kube import api as kube
from moeflow.kube.api import KubeApi, OwnershipConflict

FINETUNE = kube.Kind(naming.API_VERSION, ft.PLURAL, ft.KIND)
WAITING_REASONS = ("DatasetNotFound", "NameConflict")
"""Pending reasons that only time (or the user) can clear: the create handler retries."""


@dataclass(frozen=True)
class Refreshed:
    body: Mapping[str, Any] | None
    """The FineTune (None: gone); the object the decisions are about."""
    decisions: list[Decision]


def _decisions(observation: build.Observation) -> list[Decision]:
    return [Decision(e.reason, e.message, e.type) for e in observation.events]


def _check_config_map(api: KubeApi, namespace: str, spec: ft.FineTuneSpec
                      ) -> tuple[str, str, bool] | None:
    """(reason, message, is_final) when a ConfigMap dataset is missing or invalid."""
    ref = spec.dataset.config_map
    if ref is None:
        return None
    config_map = api.get(kube.CONFIG_MAP, namespace, ref.name)
    text = ((config_map or {}).get("data") or {}).get(ref.key)
    if text is None:
        return (ft.DATASET_NOT_FOUND, f"ConfigMap {ref.name} with key {ref.key!r} not found;"
                " fix: create it (the FineTune starts once it exists)", False)
    try:
        parse_records(text, spec.dataset.format)
    except DatasetError as e:
        return ft.INVALID_DATASET, f"ConfigMap {ref.name} key {ref.key!r}: {e}", True
    return None


def _start(api: KubeApi, settings: OperatorSettings, body: Mapping[str, Any],
           spec: ft.FineTuneSpec, attempt: int) -> str:
    """Apply the trainer's RBAC and create the attempt's Pod (409: it is there)."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    owner = as_body(body)
    for obj in build.build_trainer_rbac(name, namespace):
        kopf.adopt(obj, owner=owner)
        api.apply(obj)
    pod = build.build_trainer_pod(name, namespace, spec, attempt, settings)
    kopf.adopt(pod, owner=owner)
    if api.create(pod) is None:
        existing = api.get(kube.POD, namespace, pod["metadata"]["name"])
        if existing is not None and kube.controller_uid(existing) != meta["uid"]:
            raise OwnershipConflict(f"Pod {pod['metadata']['name']} exists but is not"
                                    f" controlled by FineTune {name}")
    return str(pod["metadata"]["name"])


def refresh_finetune(api: KubeApi, settings: OperatorSettings, namespace: str, name: str
                     ) -> Refreshed:
    body = api.get(FINETUNE, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Refreshed(None, [])
    meta = body["metadata"]
    previous: Mapping[str, Any] = body.get("status") or {}
    now, generation = now_iso(), meta.get("generation")
    if previous.get("phase") in build.FINAL_PHASES:
        return Refreshed(body, [])
    try:
        ft.check_finetune_name(name)
        spec = ft.parse_finetune_spec(body.get("spec"))
    except SpecError as e:
        observation = build.invalid("InvalidSpec", str(e), previous, now=now,
                                    generation=generation)
        return _write(api, body, previous, observation)
    attempt = int(previous.get("attempt") or 0)
    pod = api.get(kube.POD, namespace, ft.pod_name(name, attempt))
    if pod is not None and kube.controller_uid(pod) != meta["uid"]:
        message = (f"Pod {ft.pod_name(name, attempt)} exists but is not controlled by this"
                   " FineTune; fix: delete or rename it")
        observation = build.waiting("NameConflict", message, previous, now=now,
                                    generation=generation)
        return _write(api, body, previous, observation)
    if pod is None and attempt == 0 and previous.get("podName") is None:
        problem = _check_config_map(api, namespace, spec)
        if problem is not None:
            reason, message, is_final = problem
            observation = (build.invalid if is_final else build.waiting)(
                reason, message, previous, now=now, generation=generation)
            return _write(api, body, previous, observation)
    observation = build.observe(name, spec, previous, pod, now=now, generation=generation)
    patch = dict(observation.patch)
    if observation.start_attempt is not None:
        patch["podName"] = _start(api, settings, body, spec, observation.start_attempt)
    return _write(api, body, previous, build.Observation(patch, observation.events))


def _write(api: KubeApi, body: Mapping[str, Any], previous: Mapping[str, Any],
           observation: build.Observation) -> Refreshed:
    meta = body["metadata"]
    patch = dict(observation.patch)
    decisions = _decisions(observation)
    merged = {**previous, **patch}
    progress = build.milestone(merged)
    if progress is not None:
        patch.update(progress.patch)
        decisions += _decisions(progress)
    if patch and changed(previous, patch):
        api.patch_status(FINETUNE, meta["namespace"], meta["name"], patch)
    return Refreshed(body, decisions)


async def refresh(ctx: OperatorContext, namespace: str, name: str) -> None:
    """`refresh_finetune` off the event loop, one at a time per FineTune (events that arrive
    meanwhile fold into one more run), posting its decisions as Events."""
    async def run() -> None:
        result = await ctx.call(refresh_finetune, ctx.api, ctx.settings, namespace, name)
        if result.body is not None:
            post(result.body, result.decisions)

    await ctx.refreshes.run(("finetune", namespace, name), run)


async def start(ctx: OperatorContext, namespace: str, name: str) -> None:
    """Create/resume: refresh, then raise kopf.TemporaryError while the FineTune waits for
    something (kopf retries the handler), so it starts without another event."""
    await refresh(ctx, namespace, name)
    body = await ctx.call(ctx.api.get, FINETUNE, namespace, name)
    state = (body or {}).get("status") or {}
    if state.get("phase") == build.PENDING and state.get("reason") in WAITING_REASONS:
        raise kopf.TemporaryError(str(state.get("message")), delay=ctx.settings.retry_backoff_s)
