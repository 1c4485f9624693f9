"""The kubelet's part for trainer Pods, which the emulator does not play: run the Pod's real
command (`moeflow finetune ...`) as a subprocess with its volumes mapped to local folders, and
report the outcome in the Pod's status the way the kubelet does (phase, and the container's
terminated state with the termination message the trainer wrote).

Volumes: a PersistentVolumeClaim is `<node>/claims/<claim>` (subPath inside it), a ConfigMap
is a folder with its items written out from the emulator's ConfigMap, a hostPath is
`<node>/host/<path>`. The trainer reaches the emulated API server through $KUBECONFIG, as
it would through its service account in a cluster.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import kubernetes_validate
from cluster_kit import NAMESPACE, Cluster

from moeflow.controller.reconcile_finetune import FINETUNE
from moeflow.kube import api as kube

FINETUNES = "moeflow.dev/v1alpha1/finetunes"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class FineTuneCluster:
    def __init__(self, cluster: Cluster, kubeconfig: Path, node: Path) -> None:
        self.cluster = cluster
        self.kubeconfig = kubeconfig
        self.node = node

    def claim(self, name: str) -> Path:
        path = self.node / "claims" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def apply_finetune(self, obj: dict[str, Any]) -> dict[str, Any]:
        """`kubectl create` of a FineTune: defaulted, validated against the CRD, then POSTed."""
        validator = self.cluster.validator
        obj = validator.defaulted(obj)
        validator.validate(obj)
        return await self.cluster._send("POST", FINETUNE.path(NAMESPACE), obj)

    def finetune(self, name: str) -> dict[str, Any]:
        obj = self.cluster.get(FINETUNES, name)
        assert obj is not None, f"FineTune {name} is gone"
        return obj

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.finetune(name).get("status") or {})

    def validate_everything(self) -> None:
        """Every FineTune (status included) against the CRD; the operator's Pods, accounts,
        Roles and bindings against Kubernetes 1.37 (strict)."""
        for obj in self.cluster.emulator.live_objects(FINETUNES):
            self.cluster.validator.validate(obj)
        for resource in ("v1/pods", "v1/serviceaccounts", "rbac.authorization.k8s.io/v1/roles",
                         "rbac.authorization.k8s.io/v1/rolebindings"):
            for obj in self.cluster.emulator.live_objects(resource):
                kubernetes_validate.validate(obj, "1.37.0", strict=True)

    def status_patches(self, name: str) -> list[dict[str, Any]]:
        """The `status` of every PATCH of the FineTune's status, in arrival order."""
        wanted = kmock.resource(FINETUNES)
        return [dict(r.data.get("status") or {}) for r in self.cluster.emulator.request_log()
                if r.method == "PATCH" and r.resource == wanted and r.name == name
                and r.subresource == "status" and isinstance(r.data, dict)]

    # --- the kubelet ---------------------------------------------------------------------

    def _local(self, pod: dict[str, Any], scratch: Path) -> list[tuple[str, Path]]:
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        (container,) = pod["spec"]["containers"]
        mapping = []
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                local = self.claim(volume["persistentVolumeClaim"]["claimName"])
                local = local / mount.get("subPath", "")
            elif "configMap" in volume:
                source = self.cluster.get("v1/configmaps", volume["configMap"]["name"])
                assert source is not None, "the kubelet would not start this Pod"
                local = scratch / f"configmap-{mount['name']}"
                local.mkdir(parents=True, exist_ok=True)
                for item in volume["configMap"]["items"]:
                    (local / item["path"]).write_text(source["data"][item["key"]])
            else:
                local = self.node / "host" / volume["hostPath"]["path"].lstrip("/")
                local.mkdir(parents=True, exist_ok=True)
            mapping.append((mount["mountPath"], local))
        return sorted(mapping, key=lambda m: -len(m[0]))

    def command(self, pod: dict[str, Any], scratch: Path) -> tuple[list[str], Path]:
        """The container's command with container paths turned into local ones, and the
        local termination log."""
        (container,) = pod["spec"]["containers"]
        scratch.mkdir(parents=True, exist_ok=True)
        mapping = self._local(pod, scratch)
        termination_log = scratch / "termination-log"
        argv = []
        for arg in container["command"]:
            if arg == container["terminationMessagePath"]:
                arg = str(termination_log)
            for mount_path, local in mapping:
                if arg == mount_path or arg.startswith(mount_path + "/"):
                    arg = str(local) + arg[len(mount_path):]
                    break
            argv.append(arg)
        assert argv[:2] == ["moeflow", "finetune"]
        return [sys.executable, "-m", "moeflow.training", *argv[2:]], termination_log

    async def set_pod_status(self, name: str, phase: str,
                             terminated: dict[str, Any] | None = None) -> None:
        state = {"terminated": {"startedAt": _now(), "finishedAt": _now(), **terminated}} if (
            terminated) else {"running": {"startedAt": _now()}}
        await self.cluster.patch(kube.POD, name, {"status": {
            "phase": phase, "podIP": "10.0.0.9", "hostIP": "192.168.0.1",
            "containerStatuses": [{"name": "trainer", "ready": phase == "Running",
                                   "restartCount": 0, "image": "moeflow", "imageID": "",
                                   "state": state}],
        }}, subresource="status")

    async def run_pod(self, name: str, scratch: Path,
                      kill_when: Callable[[], bool] | None = None) -> tuple[int, str]:
        """Start the Pod's container, run it to its end (or SIGKILL it once `kill_when()`,
        reported like an OOM kill), and set the Pod's final status. Returns (exit code,
        stderr)."""
        pod = self.cluster.get("v1/pods", name)
        assert pod is not None
        argv, termination_log = self.command(pod, scratch)
        env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
        env.update({e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]})
        env["KUBECONFIG"] = str(self.kubeconfig)
        await self.set_pod_status(name, "Running")
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        communicate = asyncio.ensure_future(process.communicate())
        if kill_when is not None:
            while not kill_when():
                assert not communicate.done(), "the trainer ended before the kill"
                await asyncio.sleep(0.01)
            process.send_signal(signal.SIGKILL)
        _, stderr = await asyncio.wait_for(communicate, 240)
        code = process.returncode
        assert code is not None
        if code == -signal.SIGKILL:
            await self.set_pod_status(name, "Failed", {"exitCode": 137, "reason": "OOMKilled"})
            return 137, stderr.decode()
        message = termination_log.read_text() if termination_log.exists() else ""
        await self.set_pod_status(name, "Succeeded" if code == 0 else "Failed", {
            "exitCode": code, "reason": "Completed" if code == 0 else "Error",
            "message": message})
        return code, stderr.decode()
