"""docs/dashboards/moeflow-gateway.json: a Grafana dashboard whose queries use only metrics the
gateway really exports (read from its Prometheus registry, not from a copied list), and that
charts every one of them."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from moeflow.gateway.engine_client import EngineClient
from moeflow.gateway.metrics import GatewayMetrics
from moeflow.gateway.registry import ModelRegistry
from tests.unit.deploy.chart_kit import ROOT

DASHBOARD = json.loads((ROOT / "docs" / "dashboards" / "moeflow-gateway.json").read_text())
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


@pytest.fixture(scope="module")
def exported() -> dict[str, str]:
    """Sample name -> its metric family, for everything GatewayMetrics registers."""
    metrics = GatewayMetrics(ModelRegistry(EngineClient(connect_timeout_s=1,
                                                        request_timeout_s=1)))
    names: dict[str, str] = {}
    for family in metrics.registry.collect():
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = family.name
    return names


def panels() -> list[dict[str, Any]]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def test_queries_use_only_exported_metrics(exported: dict[str, str]) -> None:
    used = {name for expr in exprs() for name in re.findall(r"\bmoeflow_[a-z0-9_]+", expr)}
    assert used, "no moeflow metric in the dashboard"
    assert used <= set(exported), sorted(used - set(exported))


def test_every_exported_metric_is_charted(exported: dict[str, str]) -> None:
    charted = {exported[name] for expr in exprs()
               for name in re.findall(r"\bmoeflow_[a-z0-9_]+", expr) if name in exported}
    assert charted == set(exported.values())


def test_histograms_are_read_by_quantile_and_counters_as_rates() -> None:
    for expr in exprs():
        if re.search(r"\bmoeflow_[a-z0-9_]+_bucket\b", expr):
            assert "histogram_quantile(" in expr and "sum by (le" in expr, expr
        if re.search(r"\bmoeflow_[a-z0-9_]+(?:_total|_sum|_count)\b", expr):
            assert "rate(" in expr, f"counters are charted as rates: {expr}"


def test_dashboard_is_importable_grafana_json() -> None:
    assert DASHBOARD["uid"] == "moeflow-gateway" and DASHBOARD["schemaVersion"] >= 36
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["title"] and panel["description"], panel["id"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    cells: set[tuple[int, int]] = set()
    for panel in DASHBOARD["panels"]:  # no two panels overlap
        grid = panel["gridPos"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, panel["title"]
        cells |= area
