"""Pure builders and decisions of a WarmPool: its worker Pods, which to add or remove, and
how an EngineInstance claims one. Dicts in, dicts out; no I/O, no kopf.

A warm Pod runs one warm-pool worker (`moeflow warm-pool --port <engine port>`): the engine's
imports and torch set-up done, no model, waiting for one claim, which it takes over HTTP
(`POST /v1/claim`) on the same port an engine Pod serves on, then becomes that engine there.
It mounts the node model store read-only and gets the accelerator devices, so a claim only
has to load the weights.

Probes (a Pod's spec cannot change once claimed, so they serve both lives):
- readiness: `GET /health/ready` over HTTP, exactly as on an engine Pod. The worker answers
  it with an error until a claim's engine serves, so the Pod turns Ready only as a loaded
  engine (the EngineInstance mirrors it) and an idle warm Pod is never Ready (no Service or gateway
  routes to it).
- startup: a TCP connect on the port: passes once the worker listens, i.e. imports done and
  ready to be claimed. A Pod whose container has `started: true` and that is still idle is
  what the pool counts as ready (`is_claimable`), and what an EngineInstance may claim.
- liveness: a TCP connect too (an idle or loading worker has no /health/live, so an HTTP
  liveness probe would kill it); the socket stays open from the worker through the engine.
  A claimed engine whose loop dies still exits non-zero, and the kubelet restarts it.
Termination: the same drain timeout and grace period as an engine Pod, for the engine a
claim makes of it.

Internal token: a warm Pod is made before any Model claims it, and env from a Secret is fixed
at container start, so it cannot hold the claiming Model's token (`<model>-internal-token`),
and the worker takes its token from its own environment only, never from a claim. A claimed
warm Pod therefore serves without one: it accepts work without the header (the Model's
NetworkPolicy still admits only the Model's gateway, engines, balancer and the operator) and
calls no peer with it. That is why a decode EngineInstance never claims one: decode instances pull
KV
from prefill instances, which refuse calls without the Model's token.

Names are `<pool>-<n>` with n the lowest numbers that no Pod labelled with the pool uses, claimed
ones included: a function of the observed Pods, so a replayed event makes the same names (409 =
already there), and a claimed Pod, which keeps its name, never blocks a refill.

Claims (`reconcile_warm_pool.claim_warm_pod` does the I/O): an EngineInstance may take a warm Pod
when
`claim_refusal(task)` is None and `pod_fits` the Pod (idle, claimable, controlled by a
WarmPool, same image, same devices, same port, model store mounted over the model path).
`claim_patch` relabels the Pod as the EngineInstance's engine Pod, moves its controller reference
from
the WarmPool to the EngineInstance (the pool only counts Pods it controls, so it refills) and stamps
the EngineInstance's Pod-template hash, in one merge patch guarded by the Pod's resourceVersion.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from moeflow.controller.build_engine import (
    READY_PATH,
    drain_timeout_env,
    http_probe,
    spec_hash,
    termination_grace_s,
)
from moeflow.controller.settings import OperatorSettings
from moeflow.domain import naming
from moeflow.domain.roles import Role
from moeflow.domain.spec import TaskSpec, TransportKind, WarmPoolSpec

Obj = dict[str, Any]
SOCKET_NAME = "warm.sock"
CONTAINER = "worker"
WARM_POOL_KIND = "WarmPool"
ANNOTATION_CLAIMED_AT = "moeflow.dev/claimed-at"
"""When an EngineInstance claimed the Pod: EngineInstance `coldStart.podReadySeconds` counts from
here."""


def socket_path(settings: OperatorSettings) -> str:
    return f"{settings.warm_pool_socket_dir.rstrip('/')}/{SOCKET_NAME}"


def _tcp_probe(*, period_s: int, failure_threshold: int) -> Obj:
    return {"tcpSocket": {"port": "http"}, "periodSeconds": period_s, "timeoutSeconds": 3,
            "failureThreshold": failure_threshold}


def build_warm_pod(pool: str, namespace: str, number: int, spec: WarmPoolSpec,
                   settings: OperatorSettings) -> Obj:
    amounts: dict[str, str] = {}
    if spec.devices_per_instance > 0:
        amounts[settings.accelerator_resource] = str(spec.devices_per_instance)
    container: Obj = {
        "name": CONTAINER,
        "image": spec.image or settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["moeflow", "warm-pool", "--socket", socket_path(settings),
                    "--host", "0.0.0.0", "--port", str(settings.engine_port)],
        "ports": [{"name": "http", "containerPort": settings.engine_port, "protocol": "TCP"}],
        "env": [
            {"name": "MOEFLOW_WARM_POOL", "value": pool},
            {"name": "MOEFLOW_NAMESPACE",
             "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "MOEFLOW_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            drain_timeout_env(settings),
        ],
        "startupProbe": _tcp_probe(period_s=2, failure_threshold=max(
            1, settings.startup_timeout_s // 2)),
        "readinessProbe": http_probe("http", READY_PATH, period_s=5, failure_threshold=2),
        "livenessProbe": _tcp_probe(period_s=10, failure_threshold=3),
        "volumeMounts": [
            {"name": "run", "mountPath": settings.warm_pool_socket_dir},
            {"name": "model-store", "mountPath": settings.model_mount_path, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if amounts:
        container["resources"] = {"requests": amounts, "limits": dict(amounts)}
    pod_spec: Obj = {
        "restartPolicy": "Always",
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_s(settings),
        "containers": [container],
        "volumes": [
            {"name": "run", "emptyDir": {}},
            {"name": "model-store", "hostPath": {"path": settings.model_store_host_path,
                                                 "type": "Directory"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": naming.warm_pod_name(pool, number), "namespace": namespace,
                     "labels": naming.warm_pool_labels(pool),
                     "annotations": {naming.ANNOTATION_TEMPLATE_HASH: spec_hash(pod_spec)}},
        "spec": pod_spec,
    }


def is_claimable(pod: Mapping[str, Any]) -> bool:
    """Running, its worker listening (startup probe passed), not going away."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return (not pod["metadata"].get("deletionTimestamp")
            and (pod.get("status") or {}).get("phase") == "Running"
            and bool(statuses) and all(s.get("started") is True for s in statuses))


def claim_refusal(task: TaskSpec) -> str | None:
    """Why no warm Pod can serve this EngineInstance (None: one may)."""
    if task.role is Role.EXPERT:
        return "expert instances run their own app, not a warm worker"
    if task.role is Role.DECODE:
        return ("decode instances call prefill instances with the Model's internal token,"
                " which a warm Pod (made before any Model claims it) does not hold")
    if task.template.transport.redis_password_secret_ref is not None:
        return ("the Redis password comes from a Secret by env, fixed at container start; a"
                " warm Pod (made before any Model claims it) does not hold it")
    if task.template.source.scheme != "store":
        return (f"source {task.template.source.uri}: warm Pods mount only the node model store"
                " (store://)")
    if task.template.resources.cpu or task.template.resources.memory:
        return "the EngineInstance requests cpu/memory; warm Pods request only devices"
    if task.template.customizes_pod:
        return ("the Model sets engine args, env, scheduling or a Pod overlay; a warm Pod was"
                " started without them")
    return None


def _container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    return next((c for c in containers if c.get("name") == CONTAINER), containers[0])


def pod_fits(task: TaskSpec, pod: Mapping[str, Any], settings: OperatorSettings) -> bool:
    """An idle, claimable warm Pod (of a WarmPool) that runs what the EngineInstance's Pod
    would: same image, same number of devices, the engine port, the model store over the model
    path."""
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    controller: Mapping[str, Any] = next(
        (r for r in meta.get("ownerReferences") or [] if r.get("controller")), {})
    if (labels.get(naming.LABEL_WARM_STATE) != naming.WARM_IDLE
            or controller.get("kind") != WARM_POOL_KIND or not is_claimable(pod)):
        return False
    container = _container(pod)
    limits = (container.get("resources") or {}).get("limits") or {}
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    mounts = [m["mountPath"].rstrip("/") for m in container.get("volumeMounts") or []
              if m.get("name") == "model-store"]
    template = task.template
    return (container.get("image") == template.image
            and int(limits.get(settings.accelerator_resource, 0)) == template.devices_per_instance
            and ports.get("http") == template.port
            and any(template.model_path.startswith(f"{m}/") for m in mounts))


def pick_warm_pod(task: TaskSpec, pods: Iterable[Mapping[str, Any]],
                  settings: OperatorSettings) -> Mapping[str, Any] | None:
    """The first fitting Pod by name (deterministic), or None."""
    fitting = [p for p in pods if pod_fits(task, p, settings)]
    return min(fitting, key=lambda p: p["metadata"]["name"]) if fitting else None


def owner_reference(owner: Mapping[str, Any]) -> Obj:
    """A controller reference to `owner` (what kopf.adopt writes)."""
    meta = owner["metadata"]
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}


def claim_patch(pod: Mapping[str, Any], task_body: Mapping[str, Any], task: TaskSpec,
                template_hash: str, now: str) -> Obj:
    """The merge patch that makes a warm Pod the EngineInstance's Pod. It keeps the pool label (its
    number stays taken while the Pod lives), sets warm-state=claimed, adds the
    EngineInstance's labels (component engine: the headless Service, discovery and the
    EngineInstance's Pod handler see it),
    and replaces the owner references (the list is replaced whole by a merge patch). The
    resourceVersion makes it fail (409) if the Pod changed since it was read: two claimers
    never both win."""
    return {"metadata": {
        "resourceVersion": pod["metadata"]["resourceVersion"],
        "labels": {**naming.task_labels(task.model, task.role, task.rank),
                   naming.LABEL_WARM_STATE: naming.WARM_CLAIMED},
        "annotations": {naming.ANNOTATION_TEMPLATE_HASH: template_hash,
                        ANNOTATION_CLAIMED_AT: now},
        "ownerReferences": [owner_reference(task_body)],
    }}


def claim_message(task: TaskSpec) -> Obj:
    """What the worker becomes: the fields `moeflow engine` gets as flags on an engine Pod
    (plan.engine_argv and the Pod's transport environment)."""
    template = task.template
    settings: Obj = {
        "model_path": template.model_path, "served_model_name": task.model,
        "role": task.role.value, "rank": task.rank, "host": "0.0.0.0", "port": template.port,
        "transport": (template.transport.kind or TransportKind.SHM).value,
    }
    if template.transport.kind is TransportKind.REDIS and template.transport.redis_url:
        settings["redis_url"] = template.transport.redis_url
    if task.role is Role.ATTENTION:
        settings["num_expert_instances"] = template.expert_instances
    return {"settings": settings, "weights": None}


def claimed_pool(pod: Mapping[str, Any]) -> str | None:
    """The WarmPool an EngineInstance's Pod was claimed from (None: a Pod made for the
    EngineInstance)."""
    labels = pod["metadata"].get("labels") or {}
    if labels.get(naming.LABEL_WARM_STATE) != naming.WARM_CLAIMED:
        return None
    return labels.get(naming.LABEL_WARM_POOL)


@dataclass(frozen=True)
class PoolPlan:
    """What to do to a pool's Pods: create these numbers, delete these names."""

    create: tuple[int, ...]
    delete: tuple[str, ...]
    num_ready: int


def _number(pool: str, name: str) -> int | None:
    suffix = name.removeprefix(f"{pool}-")
    return int(suffix) if suffix != name and suffix.isdigit() else None


def plan_pool(pool: str, size: int, desired_hash: str, owned: Iterable[Mapping[str, Any]],
              taken_names: Iterable[str]) -> PoolPlan:
    """`owned`: live Pods the pool controls; `taken_names`: every Pod name labelled with the
    pool (claimed and terminating ones too). Outdated Pods (template hash) are deleted and
    replaced once gone; surplus Pods go not-claimable first, then highest number first."""
    current: list[Mapping[str, Any]] = []
    outdated: list[Mapping[str, Any]] = []
    for pod in owned:
        annotations = pod["metadata"].get("annotations") or {}
        is_outdated = annotations.get(naming.ANNOTATION_TEMPLATE_HASH) != desired_hash
        (outdated if is_outdated else current).append(pod)

    def keep_order(pod: Mapping[str, Any]) -> tuple[bool, int]:
        return (not is_claimable(pod), _number(pool, pod["metadata"]["name"]) or 0)

    current.sort(key=keep_order)
    surplus = current[size:]
    taken = {n for name in taken_names if (n := _number(pool, name)) is not None}
    missing = max(0, size - len(current))
    free = (n for n in range(len(taken) + missing + 1) if n not in taken)
    create = tuple(next(free) for _ in range(missing))
    delete = tuple(p["metadata"]["name"] for p in [*outdated, *reversed(surplus)])
    return PoolPlan(create, delete, sum(is_claimable(p) for p in current[:size]))
