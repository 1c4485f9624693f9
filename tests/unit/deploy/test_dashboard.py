"""docs/dashboards/: Grafana dashboards whose queries use only metrics the code really exports
(read from the registries or from a real /metrics, not from a copied list), and that chart every
one of them: moeflow-gateway.json (the gateway's registry) and moeflow-engines.json (a real
colocated engine, a real attention engine with its expert worker, over HTTP)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moeflow.engine.ae.expert_app import _Metrics as ExpertAppMetrics
from moeflow.engine.ae.expert_worker import ExpertWorker, checkpoint_loader
from moeflow.engine.models.arch import load_arch
from moeflow.gateway.engine_client import EngineClient
from moeflow.gateway.metrics import GatewayMetrics
from moeflow.gateway.registry import ModelRegistry
from moeflow.xccl import make_transport
from tests.integration.engine.engine_kit import body, generate, serve
from tests.reference import make_engine
from tests.unit.deploy.chart_kit import ROOT

DASHBOARD = json.loads((ROOT / "docs" / "dashboards" / "moeflow-gateway.json").read_text())
ENGINES = json.loads((ROOT / "docs" / "dashboards" / "moeflow-engines.json").read_text())
ENGINE_NAME = re.compile(r"\b(?:moeflow_[a-z0-9_]+|vllm:[a-z0-9_:]+|process_[a-z0-9_]+)")
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


def panels(dashboard: dict[str, Any] = DASHBOARD) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard: dict[str, Any] = DASHBOARD) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


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


@pytest.mark.parametrize(("dashboard", "uid"), [(DASHBOARD, "moeflow-gateway"),
                                               (ENGINES, "moeflow-engines")])
def test_dashboard_is_importable_grafana_json(dashboard: dict[str, Any], uid: str) -> None:
    DASHBOARD = dashboard  # noqa: N806 - the checks below read the dashboard under test
    assert DASHBOARD["uid"] == uid and DASHBOARD["schemaVersion"] >= 36
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(DASHBOARD):
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


def test_gateway_errors_are_5xx_and_4xx_is_charted_apart() -> None:
    by_title = {p["title"]: p for p in panels()}
    server = by_title["Server errors (5xx)"]["targets"][0]["expr"]
    assert 'status=~"5.."' in server and "status!=" not in server
    classes = [t["expr"] for t in by_title["Errors by class"]["targets"]]
    assert any('status=~"4.."' in e for e in classes) and any('status=~"5.."' in e for e in classes)


ENGINE_LABELS: dict[str, set[str]] = {}
"""Family -> label names seen on a real engine's /metrics (filled by the fixture below)."""


def _sample_names(text: str, names: dict[str, str]) -> None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                names[sample.name] = family.name
                ENGINE_LABELS.setdefault(family.name, set()).update(sample.labels)


@pytest.fixture(scope="module")
def engine_exported(tiny_dirs: dict[str, Path]) -> dict[str, str]:
    """Sample name -> family, from the /metrics of a real colocated engine and a real attention
    engine (XCCL memory backend, one expert worker), and the expert app's collector."""
    names: dict[str, str] = {}
    with serve(make_engine(tiny_dirs["llama"])) as served:
        # one request, so that labelled families (finish reasons) have samples
        assert generate(served.url, body("r", (1, 2, 3), max_tokens=2)).status == 200
        _sample_names(httpx.get(f"{served.url}/metrics", timeout=10).text, names)
    model_dir = tiny_dirs["qwen3_moe"]
    arch = load_arch(model_dir)
    transport = make_transport("memory", "dashboard-ae", "expert-0")
    worker = ExpertWorker(transport, "expert-0", ["attention-0"], arch.num_experts,
                          list(range(arch.num_experts)),
                          checkpoint_loader(model_dir, arch, torch.float32), timeout_s=10)
    worker.start()
    try:
        attention = make_engine(model_dir, role="attention", num_expert_instances=1,
                                transport="memory", group="dashboard-ae", expert_timeout_s=5)
        with serve(attention) as served:
            _sample_names(httpx.get(f"{served.url}/metrics", timeout=10).text, names)
        registry = CollectorRegistry()
        registry.register(ExpertAppMetrics(worker))
        _sample_names(generate_latest(registry).decode(), names)
    finally:
        worker.stop()
    return names


def test_engine_dashboard_uses_only_exported_metrics(engine_exported: dict[str, str]) -> None:
    used = {name for expr in exprs(ENGINES) for name in ENGINE_NAME.findall(expr)}
    assert {"vllm:num_requests_waiting", "vllm:num_requests_running",
            "vllm:kv_cache_usage_perc"} <= used
    assert used <= set(engine_exported), sorted(used - set(engine_exported))


def test_every_engine_metric_is_charted(engine_exported: dict[str, str]) -> None:
    """Everything but process_* (one panel reads a few) and info metrics (labels only)."""
    charted = {engine_exported[name] for expr in exprs(ENGINES)
               for name in ENGINE_NAME.findall(expr) if name in engine_exported}
    wanted = {family for family in engine_exported.values()
              if not family.startswith("process_") and not family.endswith("_info")}
    assert wanted <= charted, sorted(wanted - charted)
    assert any(f.startswith("process_") for f in charted)


def test_engine_dashboard_reads_histograms_by_quantile_and_counters_as_rates() -> None:
    for expr in exprs(ENGINES):
        if re.search(r"_bucket\b", expr):
            assert "histogram_quantile(" in expr and "sum by (le" in expr, expr
        if re.search(r"(?:vllm:|moeflow_)[a-z0-9_]+(?:_total|_sum|_count)\b", expr):
            assert "rate(" in expr, f"counters are charted as rates: {expr}"


def test_names_carry_base_units_and_no_reserved_label(
        exported: dict[str, str], engine_exported: dict[str, str]) -> None:
    """Prometheus conventions: seconds, not ms, in names; `instance` is the scrape target's
    label (Prometheus would rename ours to exported_instance), so engines say `engine`."""
    families = set(exported.values()) | set(engine_exported.values())
    assert not [f for f in families if re.search(r"_ms(?:_|$)", f)]
    assert "moeflow_expert_exchange_seconds" in families
    assert ENGINE_LABELS and not [f for f, labels in ENGINE_LABELS.items() if "instance" in labels]
    assert "engine" in ENGINE_LABELS["moeflow_expert_exchange_seconds"]
