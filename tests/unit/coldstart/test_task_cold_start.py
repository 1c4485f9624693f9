"""The operator copies an engine's cold-start report into Task status.coldStart."""

from __future__ import annotations

from typing import Any

from moeflow.controller import engine_report, status


def ready_pod() -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": "n"},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:05Z"}]},
    }


def test_engine_reported_steps_join_pod_ready_seconds() -> None:
    reported = {"enginePreloadSeconds": 2.0, "weightLoadSeconds": 0.5, "postLoadSeconds": 0.1}
    result = status.task_status(ready_pod(), endpoint="http://e", previous={}, now="t",
                                engine_cold_start=reported)
    assert result["coldStart"] == {"podReadySeconds": 5.0, **reported}
    assert not engine_report.needs_report(result["coldStart"])
    assert engine_report.needs_report({"podReadySeconds": 5.0})


def test_an_unreachable_engine_reports_nothing() -> None:
    assert engine_report.fetch_cold_start("127.0.0.1", 1, timeout_s=0.5) == {}
