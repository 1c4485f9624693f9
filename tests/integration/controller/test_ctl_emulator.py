"""The emulator shim's fixes, each exercised with the real kubernetes client over HTTP."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest
from kube_emulator import ClusterEmulator, matches_selector
from kubernetes.client.exceptions import ApiException

from moeflow.kube import api as kube
from moeflow.kube.api import KubeApi


@pytest.fixture
async def api(cluster: Any) -> AsyncIterator[KubeApi]:
    client = KubeApi.from_config(None)
    yield client
    client.close()


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}}


async def call(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def test_namespaces_path_is_served(api: KubeApi) -> None:
    namespaces = kube.Kind("v1", "namespaces", "Namespace", namespaced=False)
    assert [n["metadata"]["name"] for n in await call(api.list, namespaces, None)] == ["default"]
    assert (await call(api._call, "GET", "/api/v1/namespaces/default"))["kind"] == "Namespace"


async def test_create_stamps_metadata_and_generate_name(api: KubeApi) -> None:
    created = await call(api.create, pod("p1"))
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert int(meta["resourceVersion"]) > 0
    events = [{"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"generateName": "ev-", "namespace": "default"}} for _ in range(2)]
    names = [(await call(api.create, e))["metadata"]["name"] for e in events]
    assert len(set(names)) == 2 and all(n.startswith("ev-") for n in names)
    assert await call(api.create, pod("p1")) is None  # 409: already there


async def test_generation_moves_with_spec_only(api: KubeApi) -> None:
    rv0 = int((await call(api.create, pod("p1")))["metadata"]["resourceVersion"])
    after_status = await call(api.patch_status, kube.POD, "default", "p1", {"phase": "Running"})
    assert after_status["metadata"]["generation"] == 1
    rv1 = int(after_status["metadata"]["resourceVersion"])
    after_spec = await call(api.patch, kube.POD, "default", "p1", {"spec": {"hostname": "h"}})
    assert after_spec["metadata"]["generation"] == 2
    after_labels = await call(api.patch, kube.POD, "default", "p1",
                              {"metadata": {"labels": {"a": "b"}}})
    assert after_labels["metadata"]["generation"] == 2
    assert rv0 < rv1 < int(after_spec["metadata"]["resourceVersion"])


async def test_failed_json_patch_test_is_422(api: KubeApi) -> None:
    await call(api.create, pod("p1"))
    stale = [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
             {"op": "add", "path": "/metadata/labels/x", "value": "y"}]
    with pytest.raises(ApiException) as e:
        await call(lambda: api._call("PATCH", kube.POD.path("default", "p1"), body=stale,
                                     content_type="application/json-patch+json"))
    assert e.value.status == 422


async def test_label_selectors_filter_lists(api: KubeApi) -> None:
    for name, labels in [("a", {"m": "x", "r": "1"}), ("b", {"m": "x"}), ("c", {"m": "y"})]:
        await call(api.create, pod(name, **labels))
    names = [p["metadata"]["name"] for p in await call(api.list, kube.POD, "default", {"m": "x"})]
    assert names == ["a", "b"]
    assert matches_selector({"m": "x", "r": "1"}, "m=x,r,!z,m!=y")
    assert not matches_selector({"m": "x"}, "r")


async def test_finalizers_delay_deletion(api: KubeApi) -> None:
    body = pod("p1")
    body["metadata"]["finalizers"] = ["example.dev/keep"]
    await call(api.create, body)
    assert await call(api.delete, kube.POD, "default", "p1")
    held = await call(api.get, kube.POD, "default", "p1")
    assert held["metadata"]["deletionTimestamp"]
    await call(api.patch, kube.POD, "default", "p1", {"metadata": {"finalizers": None}})
    assert await call(api.get, kube.POD, "default", "p1") is None
    assert not await call(api.delete, kube.POD, "default", "p1")  # 404: already gone


async def test_refused_creations_and_garbage_collection(cluster: Any, api: KubeApi) -> None:
    emulator: ClusterEmulator = cluster.emulator
    owner = await call(api.create, pod("owner"))
    child = pod("child")
    child["metadata"]["ownerReferences"] = [{
        "apiVersion": "v1", "kind": "Pod", "name": "owner", "uid": owner["metadata"]["uid"],
        "controller": True}]
    emulator.refuse_creates("v1/pods")
    with pytest.raises(ApiException) as e:
        await call(api.create, child)
    assert e.value.status == 503
    emulator.refuse_creates("v1/pods", False)
    await call(api.create, child)
    assert await emulator.collect_garbage() == 0
    await call(api.delete, kube.POD, "default", "owner")
    assert await emulator.collect_garbage() == 1
    assert emulator.live_objects("v1/pods") == []


async def test_crds_are_discoverable(cluster: Any) -> None:
    async with cluster.session.get("/apis/moeflow.dev/v1alpha1") as response:
        resources = {r["name"]: r for r in (await response.json())["resources"]}
    assert resources["models"]["kind"] == "Model"
    assert resources["models"]["shortNames"] == ["mfm"]
    assert resources["models"]["categories"] == ["moeflow"]
    assert "models/status" in resources


def test_declare_crds_reads_every_yaml() -> None:
    emulator = ClusterEmulator()
    crd_dir = pathlib.Path(__file__).resolve().parents[3] / "deploy" / "crds"
    kinds = {crd["spec"]["names"]["kind"] for crd in emulator.declare_crds(crd_dir)}
    assert kinds == {"Model", "RoleGroup", "EngineInstance", "Request", "WarmPool", "FineTune"}
    assert emulator.resources[kmock.resource("moeflow.dev/v1alpha1/engineinstances")].kind == (
        "EngineInstance")
