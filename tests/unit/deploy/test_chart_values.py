"""charts/moeflow/values.yaml and values.schema.json: every value documented and typed, and
bad values refused by Helm before anything reaches a cluster, with a message that names the key."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.unit.deploy.chart_kit import CHART, NAMESPACE, render

VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


@pytest.mark.parametrize(("values", "message"), [
    ({"operatr": {}}, "additional properties 'operatr' not allowed"),
    ({"gateway": {"enabled": True}}, "at '/gateway/engineUrls': minItems"),
    ({"gateway": {"engineUrls": ["engine:8001"]}}, "at '/gateway/engineUrls/0'"),
    ({"gateway": {"replicas": 0}}, "at '/gateway/replicas'"),
    ({"gateway": {"service": {"type": "Ingress"}}}, "at '/gateway/service/type'"),
    ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
    ({"operator": {"logLevel": "LOUD"}}, "at '/operator/logLevel'"),
    ({"operator": {"watchNamespace": "Team_A"}}, "at '/operator/watchNamespace'"),
    ({"operator": {"engine": {"port": 70000}}}, "at '/operator/engine/port'"),
    ({"operator": {"modelGateway": {"memory": "lots"}}}, "at '/operator/modelGateway/memory'"),
    ({"operator": {"handlerWorkers": "16"}}, "at '/operator/handlerWorkers': got string"),
    ({"redis": {"externalUrl": "http://redis:6379"}}, "at '/redis/externalUrl'"),
    ({"modelStore": {"hostPath": "relative/dir"}}, "at '/modelStore/hostPath'"),
    ({"modelStore": {"preload": {"enabled": True, "models": []}}},
     "at '/modelStore/preload/models': minItems"),
    ({"devicePlugin": {"resourceName": "npu"}}, "at '/devicePlugin/resourceName'"),
    ({"serviceMonitor": {"interval": "often"}}, "at '/serviceMonitor/interval'"),
])
def test_schema_refuses_bad_values_naming_the_key(values: dict[str, Any], message: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as refused:
            chart.validate_schema(values)
        assert message in str(refused.value)
        with pytest.raises(helm.HelmValuesError):  # install/template refuse them too
            chart.render(values, name="moeflow", namespace=NAMESPACE)
    report = helm.lint(CHART, values, namespace=NAMESPACE)
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])


@pytest.mark.parametrize(("values", "message"), [
    ({"redis": {"enabled": True, "externalUrl": "redis://r:6379/0"}},
     "redis.enabled and redis.externalUrl are both set"),
    ({"operator": {"serviceAccount": {"create": False}}},
     "operator.serviceAccount.name is required when operator.serviceAccount.create is false"),
    ({"gateway": {"enabled": True, "engineUrls": ["http://e:8001"]}},
     "gateway.internalTokenSecret.name is required when gateway.enabled is true"),
])
def test_cross_field_mistakes_fail_the_render_with_the_fix(values: dict[str, Any],
                                                           message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as failed:
        render(values)
    assert message in str(failed.value)


def test_defaults_satisfy_the_schema() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})
        assert chart.values == VALUES


def leaf_paths(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict) and tree:
        return [p for k, v in tree.items() for p in leaf_paths(v, f"{prefix}/{k}")]
    return [prefix]


def schema_at(path: str) -> dict[str, Any]:
    """The schema of a value; a pass-through object (a Kubernetes securityContext, say) covers
    everything below it."""
    node = SCHEMA
    for part in path.strip("/").split("/"):
        if node.get("type") == "object" and "properties" not in node:
            break
        assert part in node.get("properties", {}), f"{path}: no schema for {part!r}"
        node = node["properties"][part]
    return dict(node)


def test_every_value_has_a_typed_and_described_schema() -> None:
    assert SCHEMA["additionalProperties"] is False
    for path in leaf_paths(VALUES):
        node = schema_at(path)
        assert node.get("description"), f"{path}: no description in values.schema.json"
        assert "type" in node or "anyOf" in node, f"{path}: no type"


def schema_leaf_paths(node: dict[str, Any], prefix: str = "") -> list[str]:
    props = node.get("properties")
    if node.get("type") == "object" and props:
        return [p for k, v in props.items() for p in schema_leaf_paths(v, f"{prefix}/{k}")]
    return [prefix]


def test_the_schema_has_no_key_that_values_yaml_lacks() -> None:
    documented = set(leaf_paths(VALUES))
    for path in schema_leaf_paths(SCHEMA):
        if path == "/global":
            continue
        # A schema object whose value is a free map in values.yaml ({} or a partial dict).
        assert path in documented or any(p.startswith(path + "/") or path.startswith(p + "/")
                                         for p in documented), path


def test_every_key_in_values_yaml_has_a_doc_comment() -> None:
    lines = VALUES_TEXT.splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        if not re.match(r"^\s*[A-Za-z][A-Za-z0-9]*:", line):
            continue
        above = number - 1
        while above >= 0 and lines[above].lstrip().startswith("#") and not lines[
                above].lstrip().startswith("# --"):
            above -= 1  # continuation lines of a multi-line comment
        if above < 0 or not lines[above].lstrip().startswith("# --"):
            undocumented.append(f"values.yaml:{number + 1}: {line.strip()}")
    assert undocumented == []
