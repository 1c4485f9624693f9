"""Pure builders and decisions of a `FineTune`: the trainer's identity (ServiceAccount, Role,
RoleBinding), its Pod, and the FineTune's status given that Pod. Dicts in, dicts out; no I/O.

A FineTune is a job of one task: one trainer Pod at a time, `<name>-finetune-<attempt>`,
restartPolicy Never. The Pod runs `moeflow finetune` (the local CLI, same flags) with
- the base model, read-only, mounted as engines mount a Model's source;
- the dataset: a ConfigMap key (as /data/train.jsonl), a file on a PVC or in the node store;
- the output (read-write): a PVC path or `<node store>/<name>`; checkpoints live there too,
  so the next attempt's Pod resumes where the last one stopped;
- `--report-to-finetune <ns>/<name>`: the trainer patches `status.progress` itself, with a
  Role that allows exactly that (get/patch on `finetunes/status` of this one FineTune);
- `--termination-log /dev/termination-log`: its outcome, "<Reason>: <message>", which the
  kubelet copies into the container's terminated state (FallbackToLogsOnError: a crash
  leaves the log tail there instead).

Status: Pending (Pod not running yet) -> Running -> Succeeded | Failed. A failed attempt whose
reason may heal (a crash, OOM, eviction, a deleted Pod) starts attempt n+1 while attempts
remain (`backoffLimit`); `finetune_spec.PERMANENT_FAILURES` (bad data, model, flags) end it
at once. Conditions: Succeeded (Unknown while it runs, then True or False with the reason)
and Progressing.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from moeflow.controller.build_rbac import build_service_account_rbac
from moeflow.controller.settings import OperatorSettings
from moeflow.controller.status import condition
from moeflow.domain import finetune_spec as ft
from moeflow.domain import naming
from moeflow.domain.finetune_spec import FineTuneSpec
from moeflow.domain.plan import model_path_for

Obj = dict[str, Any]
DATA_MOUNT = "/data"
OUTPUT_MOUNT = "/output"
CONFIG_MAP_FILE = "train.jsonl"
TERMINATION_LOG = "/dev/termination-log"
IMAGE_UID = 10001
"""The image's unprivileged user and group (Dockerfile); fsGroup makes PVC output writable."""

SUCCEEDED, PROGRESSING = "Succeeded", "Progressing"
PENDING, RUNNING, FAILED = "Pending", "Running", "Failed"
FINAL_PHASES = (SUCCEEDED, FAILED)
POD_DELETED = "PodDeleted"
_MILESTONE_PERCENT = 25


@dataclass
class _Volumes:
    volumes: list[Obj] = field(default_factory=list)
    mounts: list[Obj] = field(default_factory=list)
    claims: dict[str, str] = field(default_factory=dict)
    """claim -> volume name (one volume per claim, mounted as often as needed)."""

    def claim(self, claim: str, *, writable: bool) -> str:
        if claim not in self.claims:
            name = self.claims[claim] = f"claim-{len(self.claims)}"
            self.volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim}})
        volume = next(v for v in self.volumes if v["name"] == self.claims[claim])
        source = volume["persistentVolumeClaim"]
        source["readOnly"] = not writable and source.get("readOnly", True)
        return self.claims[claim]

    def host(self, name: str, path: str, kind: str) -> str:
        if not any(v["name"] == name for v in self.volumes):
            self.volumes.append({"name": name, "hostPath": {"path": path, "type": kind}})
        return name

    def mount(self, volume: str, path: str, *, read_only: bool, sub_path: str = "") -> None:
        mount: Obj = {"name": volume, "mountPath": path, "readOnly": read_only}
        if sub_path:
            mount["subPath"] = sub_path
        self.mounts.append(mount)


@dataclass(frozen=True)
class TrainerPaths:
    model: str
    data: str
    output: str


def _plan_volumes(spec: FineTuneSpec, settings: OperatorSettings
                  ) -> tuple[list[Obj], list[Obj], TrainerPaths]:
    v = _Volumes()
    store_root = settings.model_store_host_path
    root = settings.model_mount_path
    # Base model: where an engine would see it (store://x at <root>/x, else <root>/base).
    source = spec.base_model
    model_path = model_path_for("base", source, root)
    if source.scheme == "store":
        v.mount(v.host("store", store_root, "Directory"), root, read_only=True)
    elif source.scheme == "pvc":
        claim, _, sub_path = source.location.partition("/")
        v.mount(v.claim(claim, writable=False), model_path, read_only=True,
                sub_path=sub_path.strip("/"))
    else:
        v.mount(v.host("base-model", source.location, "Directory"), model_path, read_only=True)
    # Dataset.
    dataset = spec.dataset
    if dataset.config_map is not None:
        v.volumes.append({"name": "dataset", "configMap": {
            "name": dataset.config_map.name,
            "items": [{"key": dataset.config_map.key, "path": CONFIG_MAP_FILE}]}})
        v.mount("dataset", DATA_MOUNT, read_only=True)
        data_path = f"{DATA_MOUNT}/{CONFIG_MAP_FILE}"
    else:
        assert dataset.uri is not None
        scheme, _, rest = dataset.uri.partition("://")
        if scheme == "pvc":
            claim, _, path = rest.partition("/")
            v.mount(v.claim(claim, writable=False), DATA_MOUNT, read_only=True)
            data_path = f"{DATA_MOUNT}/{path.strip('/')}"
        else:
            if source.scheme != "store":  # else the store is already mounted at <root>
                v.mount(v.host("store", store_root, "Directory"), root, read_only=True)
            data_path = f"{root}/{rest.strip('/')}"
    # Output, read-write.
    scheme, _, rest = spec.output.uri.partition("://")
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        v.mount(v.claim(claim, writable=True), OUTPUT_MOUNT, read_only=False)
        output = f"{OUTPUT_MOUNT}/{path.strip('/')}".rstrip("/")
    else:
        v.mount(v.host("output", f"{store_root.rstrip('/')}/{rest.strip('/')}",
                       "DirectoryOrCreate"), OUTPUT_MOUNT, read_only=False)
        output = OUTPUT_MOUNT
    return v.volumes, v.mounts, TrainerPaths(model_path, data_path, output)


def trainer_paths(spec: FineTuneSpec, settings: OperatorSettings) -> TrainerPaths:
    """Where the trainer sees the base model, the dataset file and the output directory."""
    return _plan_volumes(spec, settings)[2]


def build_trainer_rbac(name: str, namespace: str) -> list[Obj]:
    """ServiceAccount, Role (get/patch the status of this FineTune only), RoleBinding."""
    rules = [{"apiGroups": [naming.GROUP], "resources": [f"{ft.PLURAL}/status"],
              "resourceNames": [name], "verbs": ["get", "patch"]}]
    return build_service_account_rbac(ft.service_account_name(name), namespace,
                                      ft.labels(name), rules)


def _resources(spec: FineTuneSpec, settings: OperatorSettings) -> Obj:
    amounts: dict[str, str] = {}
    if spec.resources.cpu:
        amounts["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        amounts["memory"] = spec.resources.memory
    if spec.devices > 0:
        amounts[settings.accelerator_resource] = str(spec.devices)
    return {"requests": amounts, "limits": dict(amounts)} if amounts else {}


def build_trainer_pod(name: str, namespace: str, spec: FineTuneSpec, attempt: int,
                      settings: OperatorSettings) -> Obj:
    volumes, mounts, paths = _plan_volumes(spec, settings)
    container: Obj = {
        "name": "trainer",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ft.trainer_argv(spec, model_path=paths.model, data_path=paths.data,
                                   output_dir=paths.output, report_to=f"{namespace}/{name}",
                                   termination_log=TERMINATION_LOG),
        # The weights are local; nothing may reach for the Hugging Face Hub.
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        "resources": _resources(spec, settings),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
    }
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": ft.pod_name(name, attempt), "namespace": namespace,
                     "labels": ft.labels(name, attempt)},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": ft.service_account_name(name),
            "automountServiceAccountToken": True,  # the trainer reports through the API
            "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "fsGroup": IMAGE_UID,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": volumes,
        },
    }


# --- status -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    reason: str
    message: str
    type: Literal["Normal", "Warning"] = "Normal"


@dataclass(frozen=True)
class Observation:
    """What the FineTune's status should become (`patch`: only the keys that change or
    should be there) and what to do next."""

    patch: Obj
    events: list[Event]
    start_attempt: int | None = None
    """Create this attempt's Pod (the first, or a retry), then write `patch` with `podName`
    set to it: a Pod that the status names and that is missing has vanished (a failure),
    so the name is only written once the Pod exists."""


def conditions(phase: str, reason: str, message: str, *, previous: Mapping[str, Any],
               now: str, generation: int | None) -> list[Obj]:
    before = previous.get("conditions") or []
    is_final = phase in FINAL_PHASES
    succeeded = condition(SUCCEEDED, phase == SUCCEEDED, reason, message, previous=before,
                          now=now, observed_generation=generation)
    if not is_final:
        unknown = next((c for c in before if c.get("type") == SUCCEEDED
                        and c.get("status") == "Unknown"), None)
        succeeded["status"] = "Unknown"
        succeeded["lastTransitionTime"] = (unknown or {}).get("lastTransitionTime") or now
    progressing = condition(PROGRESSING, not is_final, reason, message, previous=before,
                            now=now, observed_generation=generation)
    return [succeeded, progressing]


def _status(phase: str, reason: str, message: str, *, previous: Mapping[str, Any], now: str,
            generation: int | None, **extra: Any) -> Obj:
    return {"phase": phase, "reason": reason, "message": message,
            "observedGeneration": generation, **extra,
            "conditions": conditions(phase, reason, message, previous=previous, now=now,
                                     generation=generation)}


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") == "trainer":
            return ((container.get("state") or {}).get("terminated")
                    or (container.get("lastState") or {}).get("terminated") or {})
    return {}


def _waiting_reason(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") and waiting["reason"] != "ContainerCreating":
            return str(waiting["reason"]), str(waiting.get("message") or waiting["reason"])
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return str(cond.get("reason") or "Unschedulable"), str(cond.get("message") or "")
    return None


def failure_of(pod: Mapping[str, Any] | None) -> tuple[str, str, bool]:
    """(reason, message, permanent) of a failed or vanished trainer Pod."""
    if pod is None:
        return POD_DELETED, "the trainer Pod was deleted before it finished", False
    terminated = _terminated(pod)
    reason, message = ft.parse_termination_message(terminated.get("message"))
    code = terminated.get("exitCode")
    if reason is None:
        reason = str(terminated.get("reason") or (pod.get("status") or {}).get("reason")
                     or "PodFailed")
        message = message or str((pod.get("status") or {}).get("message") or (
            f"the trainer exited with code {code}" if code is not None else "the Pod failed"))
    permanent = reason in ft.PERMANENT_FAILURES or code == ft.EXIT_PERMANENT
    return reason, message, permanent


def observe(name: str, spec: FineTuneSpec, previous: Mapping[str, Any],
            pod: Mapping[str, Any] | None, *, now: str, generation: int | None
            ) -> Observation:
    """The FineTune's next status from its current attempt's Pod (None: there is none).

    Pure: the same Pod and previous status give the same answer, so replays write nothing.
    """
    phase = previous.get("phase")
    if phase in FINAL_PHASES:
        return Observation({}, [])
    attempt = int(previous.get("attempt") or 0)
    expected = ft.pod_name(name, attempt)
    if pod is None and previous.get("podName") != expected:
        # First sight of this attempt: its Pod is to be created.
        message = f"starting the trainer Pod {expected} (attempt {attempt})"
        patch = _status(PENDING, "Starting" if attempt == 0 else "Retrying",
                        str(previous.get("message") or message) if attempt else message,
                        previous=previous, now=now, generation=generation, attempt=attempt)
        return Observation(patch, [], start_attempt=attempt)
    if pod is not None and (pod.get("status") or {}).get("phase") in ("Pending", None):
        waiting = _waiting_reason(pod)
        if waiting is None and previous.get("reason") == "Retrying":
            waiting = "Retrying", str(previous.get("message"))  # why it retries, until it runs
        reason, message = waiting or ("PodPending", f"waiting for the trainer Pod {expected}"
                                      " to be scheduled and started")
        return Observation(_status(PENDING, reason, message, previous=previous, now=now,
                                   generation=generation), [])
    if pod is not None and pod["status"]["phase"] == "Running":
        message = f"training in Pod {expected} (attempt {attempt})"
        patch = _status(RUNNING, "Training", message, previous=previous, now=now,
                        generation=generation, startedAt=previous.get("startedAt") or now)
        events = [] if phase == RUNNING else [Event("Started", message)]
        return Observation(patch, events)
    if pod is not None and pod["status"]["phase"] == "Succeeded":
        _, message = ft.parse_termination_message(_terminated(pod).get("message"))
        message = message or f"the adapter is in {spec.output.uri}"
        patch = _status(SUCCEEDED, ft.COMPLETED, message, previous=previous, now=now,
                        generation=generation, completedAt=now, adapter=spec.output.uri,
                        startedAt=previous.get("startedAt") or now)
        return Observation(patch, [Event(ft.COMPLETED, message)])
    # Failed, or the Pod we made is gone.
    reason, message, permanent = failure_of(pod)
    if not permanent and attempt < spec.backoff_limit:
        following = attempt + 1
        retry = (f"attempt {attempt} failed ({reason}: {message}); attempt {following} of"
                 f" {spec.backoff_limit} more resumes from the newest checkpoint")
        patch = _status(PENDING, "Retrying", retry, previous=previous, now=now,
                        generation=generation, attempt=following)
        return Observation(patch, [Event("AttemptFailed", retry, "Warning")],
                           start_attempt=following)
    if not permanent:
        message = f"{message} (no attempts left: backoffLimit {spec.backoff_limit})"
    patch = _status(FAILED, reason, message, previous=previous, now=now, generation=generation,
                    completedAt=now)
    return Observation(patch, [Event(reason, message, "Warning")])


def invalid(reason: str, message: str, previous: Mapping[str, Any], *, now: str,
            generation: int | None) -> Observation:
    """A FineTune that cannot start: bad spec or dataset. Final."""
    if previous.get("phase") in FINAL_PHASES:
        return Observation({}, [])
    patch = _status(FAILED, reason, message, previous=previous, now=now, generation=generation,
                    completedAt=now)
    return Observation(patch, [Event(reason, message, "Warning")])


def waiting(reason: str, message: str, previous: Mapping[str, Any], *, now: str,
            generation: int | None) -> Observation:
    """A FineTune that waits for something outside it (a missing ConfigMap)."""
    patch = _status(PENDING, reason, message, previous=previous, now=now,
                    generation=generation)
    events = [] if previous.get("reason") == reason else [Event(reason, message, "Warning")]
    return Observation(patch, events)


def milestone(previous: Mapping[str, Any]) -> Observation | None:
    """An Event each time the reported progress passes a quarter of the run."""
    progress = previous.get("progress") or {}
    step, total = int(progress.get("step") or 0), int(progress.get("totalSteps") or 0)
    if previous.get("phase") != RUNNING or total <= 0:
        return None
    percent = min(100, step * 100 // total) // _MILESTONE_PERCENT * _MILESTONE_PERCENT
    if percent <= int(previous.get("progressEventPercent") or 0) or percent >= 100:
        return None
    parts = [f"step {step}/{total} ({percent}%)"]
    if progress.get("loss") is not None:
        parts.append(f"loss {float(progress['loss']):.4f}")
    if progress.get("etaSeconds") is not None:
        parts.append(f"about {datetime.timedelta(seconds=int(progress['etaSeconds']))} left")
    return Observation({"progressEventPercent": percent}, [Event("Progress", ", ".join(parts))])
