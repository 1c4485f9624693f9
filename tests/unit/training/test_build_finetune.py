"""The trainer's Pod and RBAC (strict Kubernetes 1.37 schemas), and the FineTune status as a
pure function of its Pod: phases, conditions, events, retries."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from moeflow.controller import build_finetune as build
from moeflow.controller.settings import OperatorSettings
from moeflow.domain import finetune_spec as ft
from moeflow.domain.finetune_spec import parse_finetune_spec
from moeflow.training.cli import build_parser, hyper_parameters

SETTINGS = OperatorSettings()
NOW = "2026-01-01T00:00:00Z"


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, "1.37.0", strict=True)


def spec(**extra: Any) -> ft.FineTuneSpec:
    return parse_finetune_spec({"baseModel": {"uri": "store://smol"},
                                "dataset": {"configMap": {"name": "chats", "key": "a.jsonl"}},
                                "output": {"uri": "pvc://adapters/runs/1"}, **extra})


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod["spec"]["containers"]
    return only


def mounts(pod: dict[str, Any]) -> dict[str, tuple[str, bool, str]]:
    """mountPath -> (volume source summary, readOnly, subPath)."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    out = {}
    for m in container(pod)["volumeMounts"]:
        v = volumes[m["name"]]
        source = (f"pvc:{v['persistentVolumeClaim']['claimName']}" if "persistentVolumeClaim" in v
                  else f"host:{v['hostPath']['path']}" if "hostPath" in v
                  else f"configMap:{v['configMap']['name']}")
        out[m["mountPath"]] = (source, m["readOnly"], m.get("subPath", ""))
    return out


def test_trainer_pod_runs_the_local_cli_with_its_mounts() -> None:
    pod = build.build_trainer_pod("ft", "ns", spec(hyperParameters={"maxSteps": 9}), 0, SETTINGS)
    validate(pod)
    c = container(pod)
    assert pod["metadata"]["name"] == "ft-finetune-0"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["serviceAccountName"] == "ft-finetune"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    args = build_parser().parse_args(c["command"][2:])
    assert c["command"][:2] == ["moeflow", "finetune"]
    assert (args.model, args.data, str(args.output)) == (
        "/models/smol", "/data/train.jsonl", "/output/runs/1")
    assert args.report_to_finetune == "ns/ft" and str(args.termination_log) == (
        c["terminationMessagePath"])
    assert hyper_parameters(args).max_steps == 9
    assert mounts(pod) == {
        "/models": (f"host:{SETTINGS.model_store_host_path}", True, ""),
        "/data": ("configMap:chats", True, ""),
        "/output": ("pvc:adapters", False, ""),
    }
    items = next(v for v in pod["spec"]["volumes"] if v["name"] == "dataset")["configMap"]
    assert items["items"] == [{"key": "a.jsonl", "path": "train.jsonl"}]
    assert c["resources"] == {}
    assert pod["metadata"]["labels"][ft.LABEL_FINETUNE] == "ft"
    assert pod["metadata"]["labels"][ft.LABEL_ATTEMPT] == "0"


def test_one_claim_for_model_data_and_output_is_one_volume_mounted_three_ways() -> None:
    pod = build.build_trainer_pod("ft", "ns", spec(
        baseModel={"uri": "pvc://shared/models/smol"},
        dataset={"uri": "pvc://shared/data/chat.jsonl"},
        output={"uri": "pvc://shared"}), 1, SETTINGS)
    validate(pod)
    (volume,) = pod["spec"]["volumes"]
    assert volume["persistentVolumeClaim"] == {"claimName": "shared", "readOnly": False}
    assert mounts(pod) == {"/models/base": ("pvc:shared", True, "models/smol"),
                           "/data": ("pvc:shared", True, ""),
                           "/output": ("pvc:shared", False, "")}
    args = build_parser().parse_args(container(pod)["command"][2:])
    assert (args.data, str(args.output)) == ("/data/data/chat.jsonl", "/output")
    assert pod["metadata"]["name"] == "ft-finetune-1"


def test_node_store_dataset_and_output() -> None:
    pod = build.build_trainer_pod("ft", "ns", spec(
        baseModel={"uri": "file:///opt/weights"}, dataset={"uri": "store://datasets/chat.jsonl"},
        output={"uri": "store://smol-lora"}), 0, SETTINGS)
    validate(pod)
    root = SETTINGS.model_store_host_path
    assert mounts(pod) == {"/models/base": ("host:/opt/weights", True, ""),
                           "/models": (f"host:{root}", True, ""),
                           "/output": (f"host:{root}/smol-lora", False, "")}
    output = next(v for v in pod["spec"]["volumes"] if v["name"] == "output")
    assert output["hostPath"]["type"] == "DirectoryOrCreate"
    args = build_parser().parse_args(container(pod)["command"][2:])
    assert args.data == "/models/datasets/chat.jsonl"


def test_devices_and_resources_are_requested_only_when_asked_for() -> None:
    pod = build.build_trainer_pod("ft", "ns", spec(devices=1, resources={"cpu": 4,
                                                                        "memory": "16Gi"}),
                                  0, SETTINGS)
    validate(pod)
    resources = container(pod)["resources"]
    assert resources["requests"] == {"cpu": "4", "memory": "16Gi",
                                     SETTINGS.accelerator_resource: "1"}
    assert resources["limits"] == resources["requests"]


def test_trainer_may_patch_its_own_finetune_status_and_nothing_else() -> None:
    account, role, binding = build.build_trainer_rbac("ft", "ns")
    for obj in (account, role, binding):
        validate(obj)
        assert obj["metadata"]["name"] == "ft-finetune"
    assert role["rules"] == [{"apiGroups": ["moeflow.dev"], "resources": ["finetunes/status"],
                              "resourceNames": ["ft"], "verbs": ["get", "patch"]}]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ft-finetune",
                                    "namespace": "ns"}]


# --- status --------------------------------------------------------------------------------


def pod(phase: str | None, *, terminated: dict[str, Any] | None = None,
        waiting: str | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if terminated is not None:
        state["terminated"] = terminated
    if waiting is not None:
        state["waiting"] = {"reason": waiting, "message": f"{waiting} detail"}
    status: dict[str, Any] = {"containerStatuses": [{"name": "trainer", "state": state}]}
    if phase is not None:
        status["phase"] = phase
    return {"metadata": {"name": "ft-finetune-0"}, "status": status}


def step(previous: dict[str, Any], the_pod: dict[str, Any] | None, **extra: Any
         ) -> tuple[dict[str, Any], build.Observation]:
    observation = build.observe("ft", spec(**extra), previous, the_pod, now=NOW, generation=1)
    merged = {**previous, **observation.patch}
    return {k: v for k, v in merged.items() if v is not None}, observation


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_a_run_goes_pending_running_succeeded_with_conditions_and_events() -> None:
    status, first = step({}, None)
    assert first.start_attempt == 0 and status["phase"] == "Pending"
    assert conditions(status) == {"Succeeded": ("Unknown", "Starting"),
                                  "Progressing": ("True", "Starting")}
    status["podName"] = "ft-finetune-0"
    status, seen = step(status, pod("Pending", waiting="ImagePullBackOff"))
    assert (status["phase"], status["reason"]) == ("Pending", "ImagePullBackOff")
    status, seen = step(status, pod("Running"))
    assert status["phase"] == "Running" and [e.reason for e in seen.events] == ["Started"]
    again, seen = step(status, pod("Running"))
    assert again == status and seen.events == []  # level-based: nothing new, nothing written
    done = pod("Succeeded", terminated={"exitCode": 0, "message": ft.termination_message(
        ft.COMPLETED, "adapter in /output after 9 steps")})
    status, seen = step(status, done)
    assert (status["phase"], status["reason"]) == ("Succeeded", "Completed")
    assert status["adapter"] == "pvc://adapters/runs/1" and status["completedAt"] == NOW
    assert status["message"] == "adapter in /output after 9 steps"
    assert conditions(status) == {"Succeeded": ("True", "Completed"),
                                  "Progressing": ("False", "Completed")}
    assert [(e.reason, e.type) for e in seen.events] == [("Completed", "Normal")]
    final, seen = step(status, None)
    assert final == status and seen.events == []  # final is final


def test_a_bad_dataset_fails_at_once_with_the_trainers_reason() -> None:
    status = {"phase": "Running", "attempt": 0, "podName": "ft-finetune-0"}
    failed = pod("Failed", terminated={"exitCode": 2, "reason": "Error", "message":
                                       "InvalidDataset: line 2: not valid JSON"})
    status, seen = step(status, failed)
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidDataset")
    assert status["message"] == "line 2: not valid JSON"
    assert conditions(status)["Succeeded"] == ("False", "InvalidDataset")
    assert seen.start_attempt is None
    assert [(e.reason, e.type) for e in seen.events] == [("InvalidDataset", "Warning")]


@pytest.mark.parametrize("the_pod, reason", [
    (pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"}), "OOMKilled"),
    (pod("Failed", terminated={"exitCode": 1, "reason": "Error",
                               "message": "Traceback (most recent call last): ..."}), "Error"),
    (None, "PodDeleted"),
])
def test_failures_that_may_heal_are_retried_until_the_backoff_limit(
        the_pod: dict[str, Any] | None, reason: str) -> None:
    status = {"phase": "Running", "attempt": 0, "podName": "ft-finetune-0"}
    retried, seen = step(status, the_pod, backoffLimit=1)
    assert (retried["phase"], retried["reason"], retried["attempt"]) == ("Pending", "Retrying", 1)
    assert reason in retried["message"] and seen.start_attempt == 1
    assert [(e.reason, e.type) for e in seen.events] == [("AttemptFailed", "Warning")]
    retried["podName"] = "ft-finetune-1"
    last, seen = step(retried, the_pod, backoffLimit=1)
    assert (last["phase"], last["reason"]) == ("Failed", reason)
    assert "no attempts left" in last["message"] and seen.start_attempt is None


def test_a_retry_is_recreated_if_the_operator_died_before_making_its_pod() -> None:
    status = {"phase": "Pending", "reason": "Retrying", "attempt": 1, "message": "attempt 0 …",
              "podName": "ft-finetune-0"}
    status, seen = step(status, None)
    assert seen.start_attempt == 1 and status["reason"] == "Retrying"


def test_progress_milestones_become_events_once() -> None:
    status = {"phase": "Running", "progress": {"step": 26, "totalSteps": 100, "loss": 1.5,
                                               "etaSeconds": 75}}
    first = build.milestone(status)
    assert first is not None and first.patch == {"progressEventPercent": 25}
    assert first.events[0].message == "step 26/100 (25%), loss 1.5000, about 0:01:15 left"
    assert build.milestone({**status, **first.patch}) is None
    status["progress"]["step"] = 100
    assert build.milestone(status) is None  # Completed says it
