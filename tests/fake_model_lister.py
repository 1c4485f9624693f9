"""The test double of `ModelLister` (moeflow.coldstart.store_agent): Models held in memory,
filtered by namespace as a LIST would be. `check_lister_contract` is what it and
`KubeModelLister` (against the emulated API server,
tests/integration/controller/test_ctl_store_agent.py) must both do."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from moeflow.coldstart.store_agent import ModelLister, declared_entries


def model(name: str, uri: str, *, dram_preload: bool | None = None,
          namespace: str = "default") -> dict[str, Any]:
    spec: dict[str, Any] = {"source": {"uri": uri}}
    if dram_preload is not None:
        spec["dramPreload"] = dram_preload
    return {"apiVersion": "moeflow.dev/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


# What the contract creates: one declared Model, one not, one declared with a pvc source.
CONTRACT_MODELS = (
    model("kept", "store://tiny-ckpt", dram_preload=True),
    model("plain", "store://tiny-ckpt"),
    model("on-pvc", "pvc://weights/x", dram_preload=True),
)


class FakeModelLister:
    def __init__(self, models: Iterable[Mapping[str, Any]] = (), *,
                 namespace: str | None = None) -> None:
        self.models = [dict(m) for m in models]
        self.namespace = namespace
        self.fail_next = False

    def list_models(self) -> list[Mapping[str, Any]]:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("the API server did not answer")
        return [m for m in self.models
                if self.namespace is None or m["metadata"]["namespace"] == self.namespace]


def check_lister_contract(lister_for: Callable[[str | None], ModelLister]) -> None:
    """`lister_for(namespace)` lists a world holding `CONTRACT_MODELS` in "default"."""
    for namespace in (None, "default"):
        listed = lister_for(namespace).list_models()
        assert sorted(m["metadata"]["name"] for m in listed) == ["kept", "on-pvc", "plain"]
        assert all(m["metadata"]["namespace"] == "default" for m in listed)
        assert declared_entries(listed, "float32") == {"kept--float32": "tiny-ckpt"}
    assert lister_for("elsewhere").list_models() == []
