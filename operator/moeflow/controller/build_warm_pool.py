"""Pure builders and decisions of a WarmPool: its worker Pods and which to add or remove.
Dicts in, dicts out; no I/O, no kopf.

A warm Pod runs one warm-pool worker (`moeflow warm-pool`): the engine's imports
and torch set-up done, no model, waiting on a Unix socket in a Pod-local emptyDir for one
claim. It mounts the node model store read-only and gets the accelerator devices, so a claim
only has to load the weights. Ready = the socket exists (an exec probe).

Names are `<pool>-<n>` with n the lowest numbers that no Pod labelled with the pool uses, claimed
ones included: a function of the observed Pods, so a replayed event makes the same names (409 =
already there), and a claimed Pod, which keeps its name, never blocks a refill.

Claim protocol (not built here; docs/coldstart.md): the claimer sets `moeflow.dev/warm-state:
claimed` and moves the Pod's controller reference from the WarmPool to its Task in one patch;
the pool stops counting the Pod (it only counts Pods it controls) and makes a new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from moeflow.controller import naming
from moeflow.controller.build_engine import spec_hash
from moeflow.controller.settings import OperatorSettings
from moeflow.controller.spec import WarmPoolSpec

Obj = dict[str, Any]
SOCKET_NAME = "warm.sock"


def socket_path(settings: OperatorSettings) -> str:
    return f"{settings.warm_pool_socket_dir.rstrip('/')}/{SOCKET_NAME}"


def build_warm_pod(pool: str, namespace: str, number: int, spec: WarmPoolSpec,
                   settings: OperatorSettings) -> Obj:
    socket = socket_path(settings)
    amounts: dict[str, str] = {}
    if spec.devices_per_instance > 0:
        amounts[settings.accelerator_resource] = str(spec.devices_per_instance)
    container: Obj = {
        "name": "worker",
        "image": spec.image or settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["moeflow", "warm-pool", "--socket", socket],
        "env": [{"name": "MOEFLOW_WARM_POOL", "value": pool}],
        "readinessProbe": {"exec": {"command": ["test", "-S", socket]},
                           "periodSeconds": 2, "failureThreshold": 1},
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
        "terminationGracePeriodSeconds": 10,
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


@dataclass(frozen=True)
class PoolPlan:
    """What to do to a pool's Pods: create these numbers, delete these names."""

    create: tuple[int, ...]
    delete: tuple[str, ...]
    num_ready: int


def _is_ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _number(pool: str, name: str) -> int | None:
    suffix = name.removeprefix(f"{pool}-")
    return int(suffix) if suffix != name and suffix.isdigit() else None


def plan_pool(pool: str, size: int, desired_hash: str, owned: Iterable[Mapping[str, Any]],
              taken_names: Iterable[str]) -> PoolPlan:
    """`owned`: live Pods the pool controls; `taken_names`: every Pod name labelled with the
    pool (claimed and terminating ones too). Outdated Pods (template hash) are deleted and
    replaced once gone; surplus Pods go not-ready first, then highest number first."""
    current: list[Mapping[str, Any]] = []
    outdated: list[Mapping[str, Any]] = []
    for pod in owned:
        annotations = pod["metadata"].get("annotations") or {}
        is_outdated = annotations.get(naming.ANNOTATION_TEMPLATE_HASH) != desired_hash
        (outdated if is_outdated else current).append(pod)

    def keep_order(pod: Mapping[str, Any]) -> tuple[bool, int]:
        return (not _is_ready(pod), _number(pool, pod["metadata"]["name"]) or 0)

    current.sort(key=keep_order)
    surplus = current[size:]
    taken = {n for name in taken_names if (n := _number(pool, name)) is not None}
    missing = max(0, size - len(current))
    free = (n for n in range(len(taken) + missing + 1) if n not in taken)
    create = tuple(next(free) for _ in range(missing))
    delete = tuple(p["metadata"]["name"] for p in [*outdated, *reversed(surplus)])
    return PoolPlan(create, delete, sum(_is_ready(p) for p in current[:size]))
