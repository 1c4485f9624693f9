"""Pure builders of the engine side: RoleGroup and EngineInstance custom resources, engine Pods and
the
headless discovery Service. Dicts in, dicts out; no I/O, no kopf (handlers adopt the results).

Pods are bare (one per EngineInstance, restartPolicy Always): the EngineInstance is the controller
that recreates
a lost Pod, as a StatefulSet would, but with the rank and role that the request-job-task model
needs. Pod specs are immutable, so each Pod carries a hash of what it was built from; an
EngineInstance
whose desired hash differs gets its Pod replaced.

What restarts what (every role, the expert app included, serves the same health paths):
- the engine loop dies: `/health/live` answers 503 and the process exits non-zero; the
  kubelet restarts the container (restartPolicy Always), the liveness probe being the backstop
  for a process that hangs instead of exiting;
- not ready (loop dead, transport unreachable, draining): `/health/ready` answers 503, the
  Pod turns NotReady, its EngineInstance mirrors it and gateways stop routing to it; no restart;
- loading weights: only the startup probe runs, for up to `startup_timeout_s`;
- deleted (scale-down removes the highest rank, or a template change replaces it): SIGTERM,
  the engine stops admitting and finishes its in-flight requests for up to
  `engine_drain_timeout_s`, inside a grace period a little longer than that.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from moeflow.controller.build_hub import hub_cache_volume, hub_env, hub_security_context
from moeflow.controller.build_openai_sidecar import build_openai_sidecar
from moeflow.controller.build_security import internal_token_env
from moeflow.controller.settings import OperatorSettings
from moeflow.domain import naming
from moeflow.domain.plan import JobPlan, engine_argv
from moeflow.domain.roles import Role
from moeflow.domain.spec import JobSpec, ModelSpec, TaskSpec, TaskTemplate, TransportKind

Obj = dict[str, Any]
LIVE_PATH = "/health/live"
READY_PATH = "/health/ready"
_STARTUP_PERIOD_S = 5
DRAIN_TIMEOUT_ENV = "MOEFLOW_ENGINE_DRAIN_TIMEOUT_S"
# After the drain the process still closes its transport and frees its memory; the kubelet's
# SIGKILL must come after that, never during the drain.
GRACE_AFTER_DRAIN_S = 15


def task_template(spec: ModelSpec, model_path: str, settings: OperatorSettings) -> TaskTemplate:
    """What each instance of the Model runs; the RoleGroup carries it down to its
    EngineInstances."""
    return TaskTemplate(
        image=spec.image or settings.image, source=spec.source, model_path=model_path,
        port=settings.engine_port, devices_per_instance=spec.devices_per_instance,
        resources=spec.resources,
        transport=spec.transport.model_copy(update={"kind": spec.transport_kind}),
        expert_instances=spec.role(Role.EXPERT).replicas if Role.EXPERT in spec.role_names else 0,
        attention_instances=(spec.role(Role.ATTENTION).replicas
                             if Role.ATTENTION in spec.role_names else 0),
        dram_preload=spec.dram_preload,
        engine=spec.engine, env=spec.env, node_selector=spec.node_selector,
        tolerations=spec.tolerations, affinity=spec.affinity, pod_template=spec.pod_template,
        openai_sidecar=spec.openai_sidecar,
    )


def wire(model: BaseModel) -> Obj:
    """A spec model as the camelCase dict the CRD expects."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def build_job(model: str, namespace: str, job: JobPlan, template: TaskTemplate) -> Obj:
    spec = JobSpec(model=model, role=job.role, replicas=job.replicas, template=template)
    return {
        "apiVersion": naming.API_VERSION, "kind": naming.KIND_ROLE_GROUP,
        "metadata": {"name": job.name, "namespace": namespace,
                     "labels": naming.job_labels(model, job.role),
                     "annotations": {naming.ANNOTATION_APPLIED_REPLICAS: str(job.replicas)}},
        "spec": wire(spec),
    }


def build_task(job_name: str, namespace: str, job: JobSpec, rank: int) -> Obj:
    spec = TaskSpec(model=job.model, role_group=job_name, role=job.role, rank=rank,
                    template=job.template)
    return {
        "apiVersion": naming.API_VERSION, "kind": naming.KIND_ENGINE_INSTANCE,
        "metadata": {"name": naming.task_name(job.model, job.role, rank),
                     "namespace": namespace,
                     "labels": naming.task_labels(job.model, job.role, rank)},
        "spec": wire(spec),
    }


def _model_volume(task: TaskSpec, settings: OperatorSettings) -> tuple[Obj, Obj]:
    """The weights volume and its mount, per source scheme (see Source)."""
    source = task.template.source
    if source.scheme == "hf":  # no weights volume: the engine downloads into its cache
        return hub_cache_volume(source.hub_settings)
    mount: Obj = {"name": "model", "readOnly": True}
    if source.scheme == "store":
        volume: Obj = {"name": "model", "hostPath": {"path": settings.model_store_host_path,
                                                     "type": "Directory"}}
        mount["mountPath"] = settings.model_mount_path
    elif source.scheme == "pvc":
        claim, _, sub_path = source.location.partition("/")
        volume = {"name": "model",
                  "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        mount["mountPath"] = task.template.model_path
        if sub_path:
            mount["subPath"] = sub_path
    else:  # file:///dir on every node
        volume = {"name": "model", "hostPath": {"path": source.location, "type": "Directory"}}
        mount["mountPath"] = task.template.model_path
    return volume, mount


def _dram_store(task: TaskSpec, settings: OperatorSettings) -> tuple[list[Obj], list[Obj]]:
    """The node DRAM store, read-only, for a `dramPreload` Model (else nothing). The engine
    maps a snapshot from it when there is one and loads the checkpoint otherwise, so a node
    whose store is empty or missing (DirectoryOrCreate) still serves."""
    if not task.template.dram_preload:
        return [], []
    volume = {"name": "dram-store", "hostPath": {"path": settings.dram_store_host_path,
                                                 "type": "DirectoryOrCreate"}}
    mount = {"name": "dram-store", "mountPath": settings.dram_store_mount_path,
             "readOnly": True}
    return [volume], [mount]


def _resources(template: TaskTemplate, settings: OperatorSettings) -> Obj:
    amounts: dict[str, str] = {}
    if template.resources.cpu:
        amounts["cpu"] = template.resources.cpu
    if template.resources.memory:
        amounts["memory"] = template.resources.memory
    if template.devices_per_instance > 0:
        amounts[settings.accelerator_resource] = str(template.devices_per_instance)
    # Extended resources must have requests == limits; keeping all equal gives Guaranteed QoS.
    return {"requests": amounts, "limits": dict(amounts)} if amounts else {}


def _env(template: TaskTemplate, task: TaskSpec, task_name: str,
         settings: OperatorSettings) -> list[Obj]:
    kind = template.transport.kind or TransportKind.SHM
    env: list[Obj] = [
        {"name": "MOEFLOW_TRANSPORT", "value": kind.value},
        {"name": "MOEFLOW_TASK", "value": task_name},
        {"name": "MOEFLOW_NAMESPACE",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "MOEFLOW_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        drain_timeout_env(settings),
        internal_token_env(task.model),
    ]
    if kind is TransportKind.REDIS and template.transport.redis_url:
        env.append({"name": "MOEFLOW_REDIS_URL", "value": template.transport.redis_url})
    password = template.transport.redis_password_secret_ref
    if kind is TransportKind.REDIS and password is not None:
        # not optional: an engine that cannot AUTH would only fail later, at its first transfer
        env.append({"name": "MOEFLOW_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {
            "name": password.name, "key": password.key}}})
    if template.source.scheme == "hf":
        env += hub_env(template.source.hub_settings)
    env += [{"name": k, "value": v} for k, v in template.engine.engine_env().items()]
    env += [wire(var) for var in template.env]
    return env


def drain_timeout_env(settings: OperatorSettings) -> Obj:
    return {"name": DRAIN_TIMEOUT_ENV, "value": str(settings.engine_drain_timeout_s)}


def termination_grace_s(settings: OperatorSettings) -> int:
    """Longer than the engine's drain, so SIGTERM drains and the kubelet never cuts it."""
    return settings.engine_drain_timeout_s + GRACE_AFTER_DRAIN_S


def http_probe(port_name: str, path: str, *, period_s: int, failure_threshold: int,
               timeout_s: int = 3) -> Obj:
    return {"httpGet": {"path": path, "port": port_name}, "periodSeconds": period_s,
            "timeoutSeconds": timeout_s, "failureThreshold": failure_threshold}


def engine_probes(port_name: str, settings: OperatorSettings) -> Obj:
    """Startup, readiness and liveness of an engine container (see the module docstring).

    - startup on /health/live, every 5 s for `startup_timeout_s`: weight loading may take
      minutes and liveness must not kill it; /health/live (not ready) so that a transport
      that is down at start leaves the Pod running NotReady instead of restarting it, which
      would not bring the transport back;
    - readiness on /health/ready every 5 s, 2 failures: out of rotation within ~10 s;
    - liveness on /health/live every 10 s, 3 failures of 5 s: a hung process is restarted
      within about 40 s; a busy engine answers it from its HTTP loop, not its engine loop.
    """
    return {
        "startupProbe": http_probe(port_name, LIVE_PATH, period_s=_STARTUP_PERIOD_S,
                                   failure_threshold=max(
                                       1, settings.startup_timeout_s // _STARTUP_PERIOD_S)),
        "readinessProbe": http_probe(port_name, READY_PATH, period_s=5, failure_threshold=2),
        "livenessProbe": http_probe(port_name, LIVE_PATH, period_s=10, failure_threshold=3,
                                    timeout_s=5),
    }


def build_pod(task_name: str, namespace: str, task: TaskSpec, settings: OperatorSettings) -> Obj:
    template = task.template
    volume, mount = _model_volume(task, settings)
    dram_volumes, dram_mounts = _dram_store(task, settings)
    container: Obj = {
        "name": "engine",
        "image": template.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(engine_argv(model_path=template.model_path, served_model_name=task.model,
                                    role=task.role, rank=task.rank, host="0.0.0.0",
                                    port=template.port,
                                    num_attention=template.attention_instances,
                                    num_experts=template.expert_instances,
                                    model_store=(settings.dram_store_mount_path
                                                 if template.dram_preload else None))),
        "ports": [{"name": "http", "containerPort": template.port, "protocol": "TCP"}],
        "env": _env(template, task, task_name, settings),
        "resources": _resources(template, settings),
        **engine_probes("http", settings),
        "volumeMounts": [mount, {"name": "dshm", "mountPath": "/dev/shm"}, *dram_mounts],
    }
    pod_spec: Obj = {
        # hostname + subdomain give the stable DNS name <task>.<model>-instances.<ns>.svc.
        "hostname": task_name,
        "subdomain": naming.instances_service_name(task.model),
        "restartPolicy": "Always",
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_s(settings),
        "containers": [container],
        "volumes": [volume, {"name": "dshm", "emptyDir": {"medium": "Memory"}}, *dram_volumes],
    }
    if template.openai_sidecar is not None:
        pod_spec["containers"].append(build_openai_sidecar(
            task.model, template.openai_sidecar, image=template.image, engine_port=template.port,
            settings=settings))
    if template.source.scheme == "hf" and (
            security := hub_security_context(template.source.hub_settings)):
        pod_spec["securityContext"] = security
    if template.node_selector:
        pod_spec["nodeSelector"] = dict(template.node_selector)
    if template.tolerations:
        pod_spec["tolerations"] = [wire(t) for t in template.tolerations]
    if template.affinity:
        pod_spec["affinity"] = dict(template.affinity)
    pod_spec = merge_overlay(pod_spec, template.pod_template.spec)
    overlay_meta = template.pod_template.metadata
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": task_name, "namespace": namespace,
                     # the operator's labels win: selectors and discovery rely on them
                     "labels": {**overlay_meta.labels,
                                **naming.task_labels(task.model, task.role, task.rank)},
                     "annotations": {**overlay_meta.annotations,
                                     naming.ANNOTATION_TEMPLATE_HASH: spec_hash(pod_spec)}},
        "spec": pod_spec,
    }


def merge_overlay(base: Any, overlay: Any, key: str = "") -> Any:
    """`overlay` merged over `base` (a Model's `podTemplate.spec` over the built Pod spec):
    objects merge key by key, `containers`/`initContainers` merge by name, other lists are
    appended, anything else is replaced. Pure: neither argument is changed."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for k, v in overlay.items():
            merged[k] = merge_overlay(base[k], v, k) if k in base else v
        return merged
    if isinstance(base, list) and isinstance(overlay, list):
        if key in ("containers", "initContainers"):
            by_name = {c.get("name"): i for i, c in enumerate(base)}
            merged_list = list(base)
            for item in overlay:
                i = by_name.get(item.get("name"))
                if i is None:
                    merged_list.append(item)
                else:
                    merged_list[i] = merge_overlay(base[i], item)
            return merged_list
        return [*base, *overlay]
    return overlay


def spec_hash(pod_spec: Obj) -> str:
    return hashlib.sha256(json.dumps(pod_spec, sort_keys=True).encode()).hexdigest()[:16]


def build_instances_service(model: str, namespace: str, port: int) -> Obj:
    """Headless Service over all engine Pods of a Model: per-Pod DNS for discovery. Not-ready
    addresses are published because readiness is reported through EngineInstance status instead."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": naming.instances_service_name(model), "namespace": namespace,
                     "labels": naming.model_labels(model, naming.COMPONENT_ENGINE)},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": naming.engine_selector(model),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
