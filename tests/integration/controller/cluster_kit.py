"""Test-side tools around the emulator: a kubectl-like client that validates what it applies,
the real operator in its own thread, and the kubelet/controller-manager chores the emulator
does not do (marking Pods and Deployments ready).

The operator runs with its own event loop in a thread (as kopf.testing.KopfRunner does):
kopf cancels every task of its loop when it stops, so it must not share the loop that
serves the emulator.
"""

from __future__ import annotations

import asyncio
import pathlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import kopf
import kubernetes_validate
import yaml
from crd_schema import CrdValidator
from kube_emulator import ClusterEmulator

from moeflow.domain import naming
from moeflow.kube import api as kube

T = TypeVar("T")
NAMESPACE = "default"
EXAMPLES = pathlib.Path(__file__).resolve().parents[3] / "deploy" / "examples"
BUILTIN_RESOURCES = ("v1/pods", "v1/services", "apps/v1/deployments", "v1/serviceaccounts",
                     "rbac.authorization.k8s.io/v1/roles",
                     "rbac.authorization.k8s.io/v1/rolebindings", "v1/configmaps",
                     "v1/secrets", "networking.k8s.io/v1/networkpolicies")
CUSTOM_RESOURCES = {"Model": "moeflow.dev/v1alpha1/models",
                    "RoleGroup": "moeflow.dev/v1alpha1/rolegroups",
                    "EngineInstance": "moeflow.dev/v1alpha1/engineinstances",
                    "Request": "moeflow.dev/v1alpha1/requests",
                    "WarmPool": "moeflow.dev/v1alpha1/warmpools"}


def load_example(filename: str) -> dict[str, Any]:
    """The first document of deploy/examples/<filename>."""
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / filename).read_text())
    return doc


async def wait_for(probe: Callable[[], T], *, timeout_s: float = 15.0,
                   interval_s: float = 0.05, what: str = "condition") -> T:
    """Poll `probe` until it returns something truthy; fail with its last value on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}: {value!r}")
        await asyncio.sleep(interval_s)


class OperatorRunner:
    """The real operator (kopf + moeflow.controller.main), in a thread, cluster-wide."""

    def __init__(self, memo: kopf.Memo | None = None) -> None:
        """`memo`: the operator's root memo (e.g. a `warm_claims` double, see context.py)."""
        import moeflow.controller.main  # noqa: F401  # registers the handlers

        self._memo = memo if memo is not None else kopf.Memo()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        settings = kopf.OperatorSettings()
        settings.watching.connect_timeout = 5
        settings.queueing.exit_timeout = 0.5  # a handler sleeping in a retry delay: do not wait
        try:
            asyncio.run(kopf.operator(clusterwide=True, standalone=True, settings=settings,
                                      stop_flag=self._stop, ready_flag=self._ready,
                                      memo=self._memo))
        except BaseException as e:  # surfaced by stop()
            self.error = e

    async def start(self) -> OperatorRunner:
        self._stop.clear()
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="operator", daemon=True)
        self._thread.start()
        assert await asyncio.to_thread(self._ready.wait, 15), "the operator did not start"
        return self

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 15)
        assert not self._thread.is_alive(), "the operator did not stop"
        self._thread = None
        if self.error is not None:
            raise self.error


class Cluster:
    """kubectl for tests: applies validated and defaulted objects over real HTTP."""

    def __init__(self, emulator: ClusterEmulator, session: aiohttp.ClientSession,
                 validator: CrdValidator) -> None:
        self.emulator = emulator
        self.session = session
        self.validator = validator

    async def _send(self, method: str, path: str, body: Any = None,
                    content_type: str = "application/json") -> dict[str, Any]:
        async with self.session.request(method, path, json=body,
                                        headers={"Content-Type": content_type}) as response:
            data: dict[str, Any] = await response.json()
            assert response.status < 300, f"{method} {path}: {response.status} {data}"
            return data

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create `obj` the way `kubectl create` would: CRs are defaulted and must pass their
        CRD schema (jsonschema raises otherwise); built-ins must pass kubernetes-validate."""
        if obj["kind"] in CUSTOM_RESOURCES:
            obj = self.validator.defaulted(obj)
            self.validator.validate(obj)
        else:
            kubernetes_validate.validate(dict(obj), "1.37.0", strict=True)
        obj = {**obj, "metadata": {"namespace": NAMESPACE, **obj["metadata"]}}
        return await self._send("POST", kube.kind_of(obj).path(NAMESPACE), obj)

    async def patch(self, kind: kube.Kind, name: str, patch: Mapping[str, Any], *,
                    subresource: str | None = None) -> dict[str, Any]:
        result = await self._send("PATCH", kind.path(NAMESPACE, name, subresource), patch,
                                  "application/merge-patch+json")
        if result.get("kind") in CUSTOM_RESOURCES and subresource is None:
            self.validator.validate(result)
        return result

    async def delete(self, kind: kube.Kind, name: str) -> None:
        await self._send("DELETE", kind.path(NAMESPACE, name))

    def objects(self, resource: str, labels: Mapping[str, str] | None = None
                ) -> list[dict[str, Any]]:
        wanted = dict(labels or {})
        return sorted(
            (o for o in self.emulator.live_objects(resource)
             if wanted.items() <= (o["metadata"].get("labels") or {}).items()),
            key=lambda o: o["metadata"]["name"])

    def names(self, resource: str) -> list[str]:
        return [o["metadata"]["name"] for o in self.objects(resource)]

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.objects(resource) if o["metadata"]["name"] == name), None)

    def events(self, reason: str | None = None, involved: str | None = None
               ) -> list[dict[str, Any]]:
        return [e for e in self.emulator.live_objects("v1/events")
                if (reason is None or e.get("reason") == reason)
                and (involved is None or e["involvedObject"].get("name") == involved)]

    def condition(self, resource: str, name: str, type_: str) -> dict[str, Any] | None:
        obj = self.get(resource, name) or {}
        return next((c for c in (obj.get("status") or {}).get("conditions") or []
                     if c["type"] == type_), None)

    async def mark_ready(self, model: str) -> None:
        """Play kubelet and deployment controller: every engine Pod and the gateway of `model`
        become Running and Ready."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for i, pod in enumerate(self.objects("v1/pods", {naming.LABEL_MODEL: model})):
            await self.patch(kube.POD, pod["metadata"]["name"], {"status": {
                "phase": "Running", "podIP": f"10.0.0.{i + 1}", "hostIP": "192.168.0.1",
                "conditions": [{"type": "PodScheduled", "status": "True"},
                               {"type": "Ready", "status": "True", "lastTransitionTime": now}],
            }}, subresource="status")
        gateway = naming.gateway_name(model)
        replicas = (self.get("apps/v1/deployments", gateway) or {})["spec"]["replicas"]
        await self.patch(kube.DEPLOYMENT, gateway, {"status": {
            "replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
        }}, subresource="status")

    def validate_everything(self) -> int:
        """Every object in the cluster against its schema: built-ins with kubernetes-validate
        (strict), moeflow CRs (status included) with the CRD schema. Returns the count."""
        count = 0
        for resource in BUILTIN_RESOURCES:
            for obj in self.emulator.live_objects(resource):
                kubernetes_validate.validate(obj, "1.37.0", strict=True)
                count += 1
        for resource in CUSTOM_RESOURCES.values():
            for obj in self.emulator.live_objects(resource):
                self.validator.validate(obj)
                count += 1
        return count
