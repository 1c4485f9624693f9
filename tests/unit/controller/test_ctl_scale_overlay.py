"""Pure decisions behind a RoleGroup scale (was it scaled by someone else? to what, within the
role's bounds?) and the Pod overlay merge."""

from __future__ import annotations

from typing import Any

import pytest

from moeflow.controller.build_engine import merge_overlay
from moeflow.controller.reconcile_engine import clamp_replicas, scaled_replicas
from moeflow.domain import naming
from moeflow.domain.spec import RoleSpec


def group(replicas: int, applied: str | None) -> dict[str, Any]:
    annotations = {} if applied is None else {naming.ANNOTATION_APPLIED_REPLICAS: applied}
    return {"metadata": {"name": "m-decode", "annotations": annotations},
            "spec": {"replicas": replicas}}


@pytest.mark.parametrize(("replicas", "applied", "scaled"), [
    (2, "2", None),  # as the operator wrote it: the Model decides
    (4, "2", 4),  # moved through the scale subresource
    (0, "2", 0),  # scaled to zero
    (3, None, None),  # written before the annotation existed: the Model decides
])
def test_scaled_replicas(replicas: int, applied: str | None, scaled: int | None) -> None:
    assert scaled_replicas(group(replicas, applied)) == scaled


@pytest.mark.parametrize(("wanted", "bounds", "got"), [
    (5, {}, 5),
    (20, {"maxReplicas": 8}, 8),
    (0, {"minReplicas": 1, "replicas": 1}, 1),
    (3, {"minReplicas": 1, "maxReplicas": 4, "replicas": 1}, 3),
])
def test_clamp_replicas(wanted: int, bounds: dict[str, int], got: int) -> None:
    assert clamp_replicas(wanted, RoleSpec.model_validate(bounds)) == got


def test_merge_overlay_merges_objects_appends_lists_and_containers_by_name() -> None:
    base = {"containers": [{"name": "engine", "image": "i", "volumeMounts": [{"name": "a"}]}],
            "volumes": [{"name": "a"}], "securityContext": {"runAsNonRoot": True}}
    overlay = {"containers": [{"name": "engine", "volumeMounts": [{"name": "b"}],
                               "securityContext": {"readOnlyRootFilesystem": True}},
                              {"name": "sidecar", "image": "s"}],
               "volumes": [{"name": "b"}], "securityContext": {"runAsUser": 1000},
               "priorityClassName": "p"}
    merged = merge_overlay(base, overlay)
    engine, sidecar = merged["containers"]
    assert engine == {"name": "engine", "image": "i",
                      "volumeMounts": [{"name": "a"}, {"name": "b"}],
                      "securityContext": {"readOnlyRootFilesystem": True}}
    assert sidecar == {"name": "sidecar", "image": "s"}
    assert merged["volumes"] == [{"name": "a"}, {"name": "b"}]
    assert merged["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000}
    assert merged["priorityClassName"] == "p"
    assert base["volumes"] == [{"name": "a"}]  # inputs untouched
