"""Model reconciliation (blocking; run on the handler thread pool by `main`).

`apply_model` makes the cluster match the plan: it makes sure the Model's internal token
Secret exists (created once, never patched: `ensure_internal_token`), applies every child
(create-or-patch with deterministic names, owner reference to the Model via kopf.adopt) and
deletes RoleGroups of roles
the mode no longer has, and the expert balancer's objects once the mode is no longer
attention/expert. `refresh_model_status` recomputes the status from the children.
Both are idempotent: run twice, the second run changes nothing and says so.

No finalizer: nothing outside the cluster is created, and everything inside carries an owner
reference to the Model, so deleting a Model is the cluster garbage collector's job
(Model -> RoleGroups, gateway and balancer objects -> EngineInstances -> Pods).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import kopf

from moeflow.controller import status
from moeflow.controller.build_gateway import build_model_children
from moeflow.controller.build_security import (
    build_internal_token_secret,
    existing_secret_problem,
)
from moeflow.controller.events import Decision, applied, as_body
from moeflow.controller.settings import OperatorSettings
from moeflow.domain import naming
from moeflow.domain.plan import ModelPlan, model_path_for, plan_model
from moeflow.domain.spec import ModelSpec, SpecError, check_model_name, parse_model_spec
from moeflow.kube import api as kube
from moeflow.kube.api import KubeApi, OwnershipConflict


def parse_model(body: Mapping[str, Any]) -> ModelSpec:
    check_model_name(body["metadata"]["name"])
    return parse_model_spec(body.get("spec"))


def plan_for(body: Mapping[str, Any], spec: ModelSpec, settings: OperatorSettings) -> ModelPlan:
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    return plan_model(
        name, spec, namespace=namespace,
        model_path=model_path_for(name, spec.source, settings.model_mount_path),
        engine_port=settings.engine_port, gateway_port=settings.gateway_port,
    )


def endpoint_of(body: Mapping[str, Any], settings: OperatorSettings) -> str:
    meta = body["metadata"]
    return naming.gateway_url(meta["name"], meta["namespace"], settings.gateway_port,
                              settings.cluster_domain)


def apply_model(api: KubeApi, settings: OperatorSettings, body: Mapping[str, Any]
                ) -> list[Decision]:
    """Raises SpecError for an invalid spec and OwnershipConflict for a name clash."""
    spec = parse_model(body)
    plan = plan_for(body, spec, settings)
    meta = body["metadata"]
    children = build_model_children(plan, meta["namespace"], settings)
    kopf.adopt(children, owner=as_body(body))
    decisions = ensure_internal_token(api, body)
    for child in children:
        outcome = api.apply(child)
        if outcome != "unchanged":
            decisions.append(applied(child["kind"], child["metadata"]["name"], outcome))
    wanted_jobs = {job.name for job in plan.jobs}
    for job in api.list(kube.ROLE_GROUP, meta["namespace"], {naming.LABEL_MODEL: meta["name"]}):
        job_name = job["metadata"]["name"]
        if job_name not in wanted_jobs and kube.controller_uid(job) == meta["uid"]:
            api.delete(kube.ROLE_GROUP, meta["namespace"], job_name)
            decisions.append(Decision(
                "Deleted", f"RoleGroup {job_name} deleted: mode {spec.mode.value} has no role"
                f" {job['spec'].get('role')!r}"))
    if plan.balancer is None:
        decisions += _delete_balancer(api, meta, spec)
    api.patch_status(kube.MODEL, meta["namespace"], meta["name"], {
        "observedGeneration": meta.get("generation"), "mode": spec.mode.value,
        "endpoint": endpoint_of(body, settings), "reconcileError": None,
    })
    return decisions


def ensure_internal_token(api: KubeApi, body: Mapping[str, Any]) -> list[Decision]:
    """Create `<model>-internal-token` with a fresh random token if it is absent; an existing
    one is kept as it is (a token running Pods hold is never rotated by a reconcile). Raises
    OwnershipConflict when the existing Secret cannot serve the Model."""
    meta = body["metadata"]
    # 32 random bytes, URL-safe: fits a header value as it is.
    secret = build_internal_token_secret(meta["name"], meta["namespace"],
                                         secrets.token_urlsafe(32))
    kopf.adopt(secret, owner=as_body(body))
    name = secret["metadata"]["name"]
    if api.create(secret) is not None:
        return [applied("Secret", name, "created")]
    existing = api.get(kube.SECRET, meta["namespace"], name)
    if existing is None:  # deleted between our 409 and our read
        return [applied("Secret", name, "created")] if api.create(secret) is not None else []
    problem = existing_secret_problem(existing, meta["uid"])
    if problem is not None:
        raise OwnershipConflict(problem)
    return []


# Deployment first: it is the only one that runs anything; then what it ran as.
_BALANCER_KINDS = (kube.DEPLOYMENT, kube.ROLE_BINDING, kube.ROLE, kube.SERVICE_ACCOUNT)


def _delete_balancer(api: KubeApi, meta: Mapping[str, Any], spec: ModelSpec) -> list[Decision]:
    """The balancer's objects, where this Model controls them (a mode change away from
    attention/expert). One GET per kind when there is nothing to delete."""
    name, namespace = naming.balancer_name(meta["name"]), meta["namespace"]
    decisions: list[Decision] = []
    for kind in _BALANCER_KINDS:
        obj = api.get(kind, namespace, name)
        if obj is not None and kube.controller_uid(obj) == meta["uid"] and api.delete(
                kind, namespace, name):
            decisions.append(Decision(
                "Deleted", f"{kind.kind} {name} deleted: mode {spec.mode.value} has no expert"
                " balancer"))
    return decisions


def record_error(api: KubeApi, body: Mapping[str, Any], reason: str, message: str) -> None:
    """Remember why the last reconcile failed, so every later status refresh reports it."""
    meta = body["metadata"]
    api.patch_status(kube.MODEL, meta["namespace"], meta["name"],
                     {"reconcileError": {"reason": reason, "message": message}})


def refresh_model_status(api: KubeApi, settings: OperatorSettings, namespace: str,
                         name: str) -> None:
    model = api.get(kube.MODEL, namespace, name)
    if model is None or model["metadata"].get("deletionTimestamp"):
        return
    previous: Mapping[str, Any] = model.get("status") or {}
    now = status.now_iso()
    error = previous.get("reconcileError")
    try:
        spec = parse_model(model)
    except SpecError as e:
        new = status.invalid_status(str(e), reason="InvalidSpec", previous=previous, now=now)
    else:
        if error:
            new = status.invalid_status(error["message"], reason=error["reason"],
                                        previous=previous, now=now)
        else:
            new = _status_from_children(api, settings, model, spec, previous, now)
    if status.changed(previous, new):
        api.patch_status(kube.MODEL, namespace, name, new)


def _status_from_children(api: KubeApi, settings: OperatorSettings, model: Mapping[str, Any],
                          spec: ModelSpec, previous: Mapping[str, Any], now: str
                          ) -> dict[str, Any]:
    meta = model["metadata"]
    jobs = {
        job["spec"].get("role"): job
        for job in api.list(kube.ROLE_GROUP, meta["namespace"], {naming.LABEL_MODEL: meta["name"]})
        if kube.controller_uid(job) == meta["uid"]
    }
    roles: dict[str, status.Counts] = {}
    for role in spec.role_names:
        desired = spec.role(role).replicas
        job_status = (jobs.get(role.value) or {}).get("status") or {}
        roles[role.value] = status.Counts(
            desired=desired, ready=min(desired, int(job_status.get("readyReplicas") or 0)),
            failed=int(job_status.get("failedReplicas") or 0))
    deployment = api.get(kube.DEPLOYMENT, meta["namespace"], naming.gateway_name(meta["name"]))
    gateway_ready = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
    gateway = status.Counts(desired=spec.gateway.replicas,
                            ready=min(spec.gateway.replicas, gateway_ready))
    return status.model_status(roles, gateway, endpoint=endpoint_of(model, settings),
                               generation=meta.get("generation"), previous=previous, now=now)
