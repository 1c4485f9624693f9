"""FineTunes through the real operator (kopf) on the emulated API server, with the real
trainer: the Pod's own command runs as a subprocess that reports progress to the emulator.

- a FineTune yields its trainer RBAC and Pod (strict-validated, owned); status follows the
  trainer's reports; a trainer killed mid-run (OOM) is retried by a new Pod that resumes
  from the checkpoint; the FineTune ends Succeeded with the adapter on its output claim;
- invalid JSONL fails the FineTune with reason InvalidDataset, a condition and an Event:
  from the trainer (a file on a claim) or at once, before any Pod (a ConfigMap);
- a missing ConfigMap keeps it Pending (DatasetNotFound) until the ConfigMap appears.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from cluster_kit import EXAMPLES, wait_for
from trainer_kubelet import FineTuneCluster

from moeflow.domain import finetune_spec as ft
from moeflow.training import checkpoint
from moeflow.training.data import TOY_DATASET
from moeflow.training.loop import RESULT_FILE

PODS = "v1/pods"


def example() -> tuple[dict[str, Any], dict[str, Any]]:
    config_map, finetune = yaml.safe_load_all((EXAMPLES / "finetune-toy.yaml").read_text())
    return config_map, finetune


def finetune(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "moeflow.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": name},
            "spec": {"baseModel": {"uri": "pvc://models/tiny-llama"},
                     "dataset": {"configMap": {"name": "toy"}},
                     "output": {"uri": "pvc://adapters/run-1"},
                     "hyperParameters": {"maxSteps": 40, "checkpointEvery": 4, "batchSize": 4,
                                         "learningRate": 0.005, "maxLength": 128},
                     **spec}}


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions") or []}


def controller_of(obj: dict[str, Any]) -> tuple[str, str]:
    (ref,) = [r for r in obj["metadata"]["ownerReferences"] if r.get("controller")]
    return ref["kind"], ref["name"]


async def apply_config_map(kube: FineTuneCluster, name: str, text: str) -> None:
    await kube.cluster.apply({"apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": {"name": name}, "data": {"train.jsonl": text}})


def install_model(kube: FineTuneCluster, tiny: Path) -> None:
    shutil.copytree(tiny, kube.claim("models") / "tiny-llama")


async def test_finetune_trains_reports_progress_survives_a_kill_and_succeeds(
        cluster: FineTuneCluster, operator: object, tiny_dirs: dict[str, Path],
        tmp_path: Path) -> None:
    kube = cluster
    install_model(kube, tiny_dirs["llama"])
    await apply_config_map(kube, "toy", TOY_DATASET.read_text())
    await kube.apply_finetune(finetune("tiny"))

    pod = await wait_for(lambda: kube.cluster.get(PODS, "tiny-finetune-0"), what="trainer Pod")
    assert controller_of(pod) == ("FineTune", "tiny")
    for kind, name in (("v1/serviceaccounts", "tiny-finetune"),
                       ("rbac.authorization.k8s.io/v1/roles", "tiny-finetune"),
                       ("rbac.authorization.k8s.io/v1/rolebindings", "tiny-finetune")):
        child = kube.cluster.get(kind, name)
        assert child is not None and controller_of(child) == ("FineTune", "tiny")
    await wait_for(lambda: kube.status("tiny").get("podName") == "tiny-finetune-0",
                   what="podName")
    assert kube.status("tiny")["phase"] == "Pending"
    kube.validate_everything()

    # Attempt 0: the trainer runs until its first checkpoints, then is killed (OOM).
    output = kube.claim("adapters") / "run-1"
    code, _ = await kube.run_pod("tiny-finetune-0", tmp_path / "attempt-0",
                                 kill_when=lambda: len(checkpoint.complete(output)) > 0)
    assert code == 137
    kept = checkpoint.latest(output)
    assert kept is not None
    kept_step = json.loads((kept / checkpoint.STATE_FILE).read_text())["step"]
    retry = await wait_for(lambda: kube.cluster.get(PODS, "tiny-finetune-1"),
                           what="the retry's Pod")
    status = await wait_for(lambda: kube.status("tiny").get("podName") == "tiny-finetune-1"
                            and kube.status("tiny"), what="attempt 1 in the status")
    assert (status["attempt"], status["phase"], status["reason"]) == (1, "Pending", "Retrying")
    assert "OOMKilled" in status["message"]
    assert retry["metadata"]["labels"][ft.LABEL_ATTEMPT] == "1"
    assert kube.cluster.events("AttemptFailed", "tiny")

    # Attempt 1 resumes from the checkpoint and finishes.
    code, stderr = await kube.run_pod("tiny-finetune-1", tmp_path / "attempt-1")
    assert code == 0, stderr
    final = await wait_for(lambda: kube.status("tiny").get("phase") == "Succeeded"
                           and kube.status("tiny"), what="Succeeded")
    assert final["reason"] == "Completed" and final["adapter"] == "pvc://adapters/run-1"
    assert final["message"].startswith(f"adapter in {output} after 40 steps")
    assert conditions(final) == {"Succeeded": ("True", "Completed"),
                                 "Progressing": ("False", "Completed")}
    progress = final["progress"]
    assert (progress["step"], progress["totalSteps"], progress["resumedFromStep"]) == (
        40, 40, kept_step)
    assert progress["loss"] > 0 and progress["tokensPerSecond"] > 0
    assert progress["etaSeconds"] == 0 and progress["checkpointStep"] >= kept_step
    # The trainer reported as it went: steps only move forward within an attempt, and the
    # second attempt started from the checkpoint, not from 0.
    steps = [p["progress"]["step"] for p in kube.status_patches("tiny") if "progress" in p]
    assert steps[0] == 0 and kept_step in steps and steps[-1] == 40
    restart = steps.index(kept_step, 1)
    assert steps[restart:] == sorted(steps[restart:])
    assert any(kept_step < s < 40 for s in steps)
    # Events: started (twice: one per attempt), progress milestones, completed.
    assert len(kube.cluster.events("Started", "tiny")) >= 1
    await wait_for(lambda: kube.cluster.events("Completed", "tiny"), what="Completed event")
    assert await wait_for(lambda: kube.cluster.events("Progress", "tiny"), what="Progress")
    # The adapter is on the claim, in PEFT format, and no Pod of a third attempt was made.
    assert json.loads((output / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((output / RESULT_FILE).read_text())["resumed_from_step"] == kept_step
    assert kube.cluster.get(PODS, "tiny-finetune-2") is None
    kube.validate_everything()


async def test_invalid_jsonl_on_a_claim_fails_through_the_trainer(
        cluster: FineTuneCluster, operator: object, tiny_dirs: dict[str, Path],
        tmp_path: Path) -> None:
    kube = cluster
    install_model(kube, tiny_dirs["llama"])
    data = kube.claim("data")
    good = TOY_DATASET.read_text().splitlines()[0]
    (data / "bad.jsonl").write_text(f"{good}\n{{\"messages\": [oops]}}\n")
    await kube.apply_finetune(finetune("bad", dataset={"uri": "pvc://data/bad.jsonl"}))
    await wait_for(lambda: kube.cluster.get(PODS, "bad-finetune-0"), what="trainer Pod")
    code, _ = await kube.run_pod("bad-finetune-0", tmp_path / "run")
    assert code == ft.EXIT_PERMANENT
    final = await wait_for(lambda: kube.status("bad").get("phase") == "Failed"
                           and kube.status("bad"), what="Failed")
    assert final["reason"] == "InvalidDataset"
    assert final["message"].startswith("line 2: not valid JSON")
    assert conditions(final) == {"Succeeded": ("False", "InvalidDataset"),
                                 "Progressing": ("False", "InvalidDataset")}
    (event,) = await wait_for(lambda: kube.cluster.events("InvalidDataset", "bad"),
                              what="the Warning event")
    assert event["type"] == "Warning" and "line 2" in event["message"]
    assert kube.cluster.get(PODS, "bad-finetune-1") is None  # bad data is never retried
    kube.validate_everything()


async def test_invalid_jsonl_in_a_config_map_fails_before_any_pod(
        cluster: FineTuneCluster, operator: object) -> None:
    kube = cluster
    config_map, spec = example()
    config_map["data"]["train.jsonl"] += "this is not json\n"
    await kube.cluster.apply(config_map)
    await kube.apply_finetune(spec)
    name = spec["metadata"]["name"]
    final = await wait_for(lambda: kube.status(name).get("phase") == "Failed"
                           and kube.status(name), what="Failed")
    assert final["reason"] == "InvalidDataset"
    assert "line 5: not valid JSON" in final["message"]
    # the Event is posted after the status patch: wait for it rather than race it
    await wait_for(lambda: kube.cluster.events("InvalidDataset", name), what="the Event")
    assert kube.cluster.objects(PODS) == []
    kube.validate_everything()


async def test_a_missing_config_map_waits_then_starts(cluster: FineTuneCluster,
                                                      operator: object) -> None:
    kube = cluster
    config_map, spec = example()
    name = spec["metadata"]["name"]
    await kube.apply_finetune(copy.deepcopy(spec))
    waiting = await wait_for(lambda: kube.status(name).get("reason") == "DatasetNotFound"
                             and kube.status(name), what="DatasetNotFound")
    assert waiting["phase"] == "Pending"
    assert conditions(waiting)["Succeeded"] == ("Unknown", "DatasetNotFound")
    await wait_for(lambda: kube.cluster.events("DatasetNotFound", name), what="the Event")
    assert kube.cluster.objects(PODS) == []
    await kube.cluster.apply(config_map)
    pod = await wait_for(lambda: kube.cluster.get(PODS, f"{name}-finetune-0"),
                         what="the Pod once the ConfigMap exists")
    (container,) = pod["spec"]["containers"]
    assert container["command"][container["command"].index("--base-model-name") + 1] == (
        "store://smollm2-135m-instruct")
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    kube.validate_everything()
