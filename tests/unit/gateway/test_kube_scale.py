"""The Kubernetes `ScaleUpRequester`: returns at once, patches only roles at zero, locked on
the resourceVersion, and leaves an awake Model alone (against an in-memory KubeApi double)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from moeflow.gateway.kube_scale import KubeScaleUp
from moeflow.kube import api as kube
from moeflow.kube.api import Conflict


class FakeApi:
    """get/patch of Models in one namespace; a merge patch of spec.roles only."""

    def __init__(self, model: dict[str, Any], *, conflicts: int = 0) -> None:
        self.model = model
        self.patches: list[Mapping[str, Any]] = []
        self.conflicts = conflicts
        self.release = threading.Event()
        self.release.set()

    def get(self, kind: kube.Kind, namespace: str, name: str) -> dict[str, Any] | None:
        self.release.wait(5)
        return self.model if name == self.model["metadata"]["name"] else None

    def patch(self, kind: kube.Kind, namespace: str, name: str,
              patch: Mapping[str, Any]) -> dict[str, Any]:
        if self.conflicts:
            self.conflicts -= 1
            raise Conflict("moved")
        assert patch["metadata"]["resourceVersion"] == self.model["metadata"]["resourceVersion"]
        self.patches.append(patch)
        for role, fields in patch["spec"]["roles"].items():
            self.model["spec"]["roles"].setdefault(role, {}).update(fields)
        return self.model

    def close(self) -> None:
        return None


def model(replicas: int, minimum: int = 0) -> dict[str, Any]:
    return {"metadata": {"name": "m", "resourceVersion": "7"},
            "spec": {"source": {"uri": "store://m"}, "roles": {"colocated": {
                "replicas": replicas, "minReplicas": minimum, "maxReplicas": 4}}}}


def requester(api: FakeApi) -> KubeScaleUp:
    return KubeScaleUp("default", api=api)  # type: ignore[arg-type]


def test_wake_patches_a_model_at_zero_once() -> None:
    api = FakeApi(model(0))
    scale = requester(api)
    assert scale.wake("m", 3) is True
    assert api.patches == [{"metadata": {"resourceVersion": "7"},
                            "spec": {"roles": {"colocated": {"replicas": 1}}}}]
    assert scale.wake("m", 3) is False  # awake now: idempotent
    assert scale.wake("other", 1) is False  # no such Model
    assert len(api.patches) == 1
    scale.close()


def test_wake_honours_min_replicas_and_retries_a_lost_race_on_the_next_call() -> None:
    api = FakeApi(model(0), conflicts=1)
    scale = requester(api)
    assert scale.wake("m") is False
    assert scale.wake("m") is True
    assert api.model["spec"]["roles"]["colocated"]["replicas"] == 1
    scale.close()


def test_request_scale_up_returns_at_once_and_drops_calls_while_one_runs() -> None:
    api = FakeApi(model(0))
    api.release.clear()  # the API server is slow
    scale = requester(api)
    started = time.monotonic()
    for _ in range(5):
        scale.request_scale_up("m", 1)
    assert time.monotonic() - started < 0.5
    api.release.set()
    deadline = time.monotonic() + 5
    while not api.patches and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(api.patches) == 1
    scale.close()


def test_the_gateway_role_may_patch_only_its_own_model() -> None:
    from moeflow.controller.build_gateway import build_gateway_rbac

    (_, role, _) = build_gateway_rbac("m", "ns")
    patching = [r for r in role["rules"] if "patch" in r["verbs"]]
    assert patching == [{"apiGroups": ["moeflow.dev"], "resources": ["models"],
                         "resourceNames": ["m"], "verbs": ["patch"]}]
