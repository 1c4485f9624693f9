"""Discovery from Task objects, and the pure helpers of the API facade."""

from __future__ import annotations

from typing import Any

import pytest

from moeflow.kube import api as kube
from moeflow.kube.discovery import Instance, KubeTaskDiscovery, instances_from_tasks


def task(role: str, rank: int, ready: bool | None, **meta: Any) -> dict[str, Any]:
    status = {} if ready is None else {"ready": ready, "endpoint": f"http://{role}-{rank}:8001"}
    return {
        "metadata": {"name": f"m-{role}-{rank}", **meta},
        "spec": {"model": "m", "role": role, "rank": rank},
        "status": status,
    }


def test_instances_are_sorted_and_skip_unobserved_or_deleted_tasks() -> None:
    tasks = [
        task("decode", 1, True),
        task("prefill", 0, False),
        task("decode", 0, True),
        task("decode", 2, None),
        task("decode", 3, True, deletionTimestamp="now"),
        {"metadata": {}, "spec": {}},
    ]
    assert instances_from_tasks(tasks) == [
        Instance("m", "decode", 0, "http://decode-0:8001", True),
        Instance("m", "decode", 1, "http://decode-1:8001", True),
        Instance("m", "prefill", 0, "http://prefill-0:8001", False),
    ]


def test_kind_paths() -> None:
    assert kube.POD.path("ns", "p", "status") == "/api/v1/namespaces/ns/pods/p/status"
    assert kube.DEPLOYMENT.path("ns") == "/apis/apps/v1/namespaces/ns/deployments"
    assert kube.MODEL.path(None) == "/apis/moeflow.dev/v1alpha1/models"
    instance = {"apiVersion": "moeflow.dev/v1alpha1", "kind": "EngineInstance"}
    assert kube.kind_of(instance) is kube.ENGINE_INSTANCE
    with pytest.raises(ValueError, match="unknown kind"):
        kube.kind_of({"apiVersion": "v1", "kind": "Node"})


def test_is_subset_tolerates_server_defaults_but_not_changes() -> None:
    desired = {"spec": {"ports": [{"port": 80}], "selector": {"a": "b"}}}
    actual = {
        "spec": {
            "ports": [{"port": 80, "protocol": "TCP"}],
            "selector": {"a": "b"},
            "clusterIP": "10.0.0.1",
        },
        "status": {},
    }
    assert kube.is_subset(desired, actual)
    assert not kube.is_subset({"spec": {"ports": [{"port": 81}]}}, actual)
    assert not kube.is_subset({"spec": {"ports": [{"port": 80}, {"port": 81}]}}, actual)
    assert not kube.is_subset({"spec": {"replicas": 2}}, actual)


def test_controller_uid() -> None:
    obj = {"metadata": {"ownerReferences": [{"uid": "x"}, {"uid": "y", "controller": True}]}}
    assert kube.controller_uid(obj) == "y"
    assert kube.controller_uid({"metadata": {}}) is None


class FakeApi:
    """Answers LISTs from a script: a list of Tasks, or an exception to raise."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.selectors: list[Any] = []

    def list(self, kind: Any, namespace: str, labels: Any) -> list[dict[str, Any]]:
        self.selectors.append((kind, namespace, labels))
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        return list(step)

    def close(self) -> None:
        pass


async def test_kube_discovery_lists_by_label_and_watch_yields_changes_only() -> None:
    one = [task("decode", 0, False)]
    two = [task("decode", 0, True)]
    api = FakeApi([one, one, ConnectionError("api down"), two])
    discovery = KubeTaskDiscovery("serving", api=api)  # type: ignore[arg-type]
    assert [i.is_ready for i in await discovery.list_instances("m")] == [False]
    assert api.selectors[0] == (kube.ENGINE_INSTANCE, "serving", {"moeflow.dev/model": "m"})
    seen = []
    async for instances in discovery.watch("m", interval_s=0.001):
        seen.append([i.is_ready for i in instances])
        if len(seen) == 2:
            break
    assert seen == [[False], [True]]
