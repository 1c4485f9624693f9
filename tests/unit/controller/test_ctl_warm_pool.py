"""WarmPool builders and plan: the worker Pod, and which Pods to create or delete."""

from __future__ import annotations

from typing import Any

from moeflow.controller import naming
from moeflow.controller.build_warm_pool import build_warm_pod, plan_pool, socket_path
from moeflow.controller.settings import OperatorSettings
from moeflow.controller.spec import WarmPoolSpec, parse_spec
from moeflow.controller.status import Counts, warm_pool_status

SETTINGS = OperatorSettings()
HASH = "h1"


def pod(number: int, *, ready: bool = True, template_hash: str = HASH) -> dict[str, Any]:
    return {"metadata": {"name": f"p-{number}",
                         "annotations": {naming.ANNOTATION_TEMPLATE_HASH: template_hash}},
            "status": {"conditions": [{"type": "Ready", "status": str(ready)}]}}


def test_warm_pod_runs_the_worker_labelled_for_claiming_with_store_and_devices() -> None:
    spec = parse_spec(WarmPoolSpec, {"size": 2, "devicesPerInstance": 2})
    built = build_warm_pod("p", "ns", 3, spec, SETTINGS)
    assert built["metadata"]["name"] == "p-3" and built["metadata"]["namespace"] == "ns"
    labels = built["metadata"]["labels"]
    assert labels[naming.LABEL_WARM_POOL] == "p"
    assert labels[naming.LABEL_WARM_STATE] == naming.WARM_IDLE
    assert labels[naming.LABEL_COMPONENT] == naming.COMPONENT_WARM_POOL
    (container,) = built["spec"]["containers"]
    assert container["image"] == SETTINGS.image
    assert container["command"][-2:] == ["--socket", socket_path(SETTINGS)]
    assert container["readinessProbe"]["exec"]["command"] == ["test", "-S",
                                                              socket_path(SETTINGS)]
    assert container["resources"]["limits"] == {SETTINGS.accelerator_resource: "2"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["model-store"]["readOnly"] is True
    custom = build_warm_pod("p", "ns", 0, parse_spec(WarmPoolSpec, {"image": "img:2"}),
                            SETTINGS)
    assert custom["spec"]["containers"][0]["image"] == "img:2"
    assert "resources" not in custom["spec"]["containers"][0]
    # The hash depends on the template, not on the number.
    hashes = {build_warm_pod("p", "ns", n, spec, SETTINGS)["metadata"]["annotations"][
        naming.ANNOTATION_TEMPLATE_HASH] for n in range(3)}
    assert len(hashes) == 1


def test_plan_fills_the_lowest_numbers_no_pod_uses_claimed_ones_included() -> None:
    plan = plan_pool("p", 3, HASH, [pod(1)], ["p-0", "p-1"])  # p-0 was claimed
    assert plan.create == (2, 3) and plan.delete == () and plan.num_ready == 1
    assert plan_pool("p", 2, HASH, [], []).create == (0, 1)
    assert plan_pool("p", 2, HASH, [pod(0), pod(1)], ["p-0", "p-1"]).create == ()


def test_plan_deletes_surplus_not_ready_first_then_highest_and_replaces_outdated() -> None:
    owned = [pod(0), pod(1, ready=False), pod(2), pod(3)]
    plan = plan_pool("p", 2, HASH, owned, [f"p-{n}" for n in range(4)])
    assert plan.delete == ("p-1", "p-3") and plan.create == () and plan.num_ready == 2
    outdated = plan_pool("p", 2, HASH, [pod(0), pod(1, template_hash="old")], ["p-0", "p-1"])
    assert outdated.delete == ("p-1",) and outdated.create == (2,)


def test_warm_pool_status_has_counts_and_three_conditions() -> None:
    new = warm_pool_status(Counts(desired=2, ready=1), generation=3, previous={}, now="t")
    assert (new["desired"], new["ready"]) == (2, 1)
    ready, progressing, degraded = new["conditions"]
    assert ready["status"] == "False" and progressing["status"] == "True"
    assert degraded["status"] == "False" and ready["observedGeneration"] == 3
    full = warm_pool_status(Counts(desired=2, ready=2), generation=3, previous=new, now="t2")
    assert full["conditions"][0]["status"] == "True"
