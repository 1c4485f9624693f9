"""The install and operations guides say things the repository must keep true: the files they
name exist, every `--set` they show is a valid chart value, and the names they use are the ones
the chart and the operator really make."""

from __future__ import annotations

import re

import helm_python as helm
import pytest
import yaml

from moeflow.controller.settings import OperatorSettings
from moeflow.domain import naming
from moeflow.domain.roles import Role
from tests.unit.deploy.chart_kit import CHART, ROOT, find, render_objects

DOCS = {name: (ROOT / "docs" / name).read_text()
        for name in ("install-kind.md", "install-minikube.md", "operations.md")}
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_repository_path_named_exists(doc: str) -> None:
    paths = set(re.findall(r"\b((?:deploy|charts|docs)/[\w./-]*[\w/])", DOCS[doc]))
    paths |= {f"docs/{p}" for p in re.findall(r"\]\(((?:dashboards/)?[\w-]+\.(?:md|json))\)",
                                              DOCS[doc])}
    assert paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert missing == []


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_set_flag_is_a_valid_chart_value(doc: str) -> None:
    expressions = re.findall(r"--set\s+([\w.]+=[^\s`)]*)", DOCS[doc])
    assert expressions or doc == "operations.md"
    with helm.Chart.load(CHART) as chart:
        for expression in expressions:
            chart.validate_schema(helm.parse_set_string(expression))


def test_kind_mount_is_the_charts_node_model_store() -> None:
    config = DOCS["install-kind.md"].split("cat > /tmp/moeflow-kind.yaml <<EOF\n")[1]
    config = config.split("\nEOF")[0].replace("${HOME}", "/home/me")
    (node,) = yaml.safe_load(config)["nodes"]
    (mount,) = node["extraMounts"]
    assert mount["containerPath"] == VALUES["modelStore"]["hostPath"]
    assert mount["hostPath"] == "/home/me/.cache/moeflow/models"  # where `models pull` writes
    minikube = re.search(r'--mount-string "\$\{HOME\}/\.cache/moeflow/models:([^"]+)"',
                         DOCS["install-minikube.md"])
    assert minikube and minikube.group(1) == VALUES["modelStore"]["hostPath"]


def test_image_the_guides_build_is_the_one_the_chart_runs() -> None:
    operator = find(render_objects(), "Deployment", "moeflow-operator")
    image = operator["spec"]["template"]["spec"]["containers"][0]["image"]
    assert f"docker build -t {image} ." in DOCS["install-kind.md"]
    assert f"kind load docker-image {image}" in DOCS["install-kind.md"]
    assert f"image build -t {image} ." in DOCS["install-minikube.md"]


def test_gateway_and_redis_names_in_the_guides_are_the_real_ones() -> None:
    colocated = yaml.safe_load((ROOT / "deploy/examples/model-colocated.yaml").read_text())
    gateway = naming.gateway_name(colocated["metadata"]["name"])
    for doc in ("install-kind.md", "install-minikube.md"):
        assert f"kubectl port-forward service/{gateway} 8000:8000" in DOCS[doc]
    example = (ROOT / "deploy/examples/model-pd-disaggregated.yaml").read_text()
    sed = re.search(r"sed 's#([^#]+)#([^#]+)#'", DOCS["install-kind.md"])
    assert sed is not None
    old, new = sed.groups()
    assert old in example
    redis = find(render_objects({"redis": {"enabled": True}}), "Service", "moeflow-redis")
    assert new == (f"redis://{redis['metadata']['name']}.{redis['metadata']['namespace']}"
                   ".svc.cluster.local:6379/0")


def test_token_secret_policy_and_instance_names_in_the_guides_are_the_real_ones() -> None:
    colocated = yaml.safe_load((ROOT / "deploy/examples/model-colocated.yaml").read_text())
    model = colocated["metadata"]["name"]
    kind = DOCS["install-kind.md"]
    assert f"kubectl get secret {naming.internal_token_secret_name(model)} " in kind
    assert f"kubectl get networkpolicy {naming.engines_network_policy_name(model)} " in kind
    url = naming.instance_url(model, Role.COLOCATED, 0, "default",
                              OperatorSettings().engine_port)
    assert f"{url}/health/live" in kind
    operations = DOCS["operations.md"]
    for name in ("<model>-internal-token", "<model>-engines", "<release>-gateway-to-engines",
                 "MOEFLOW_INTERNAL_TOKEN", "MOEFLOW_ENGINE_DRAIN_TIMEOUT_S",
                 "MOEFLOW_OPERATOR_NAMESPACE"):
        assert name in operations, name
    assert "## On a cluster" in operations
