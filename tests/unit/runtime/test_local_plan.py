"""`moeflow up` decides what to run with the operator's own spec and planner."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeflow.cli import build_parser, platform_settings
from moeflow.domain.plan import plan_model
from moeflow.domain.spec import SpecError, parse_model_spec
from moeflow.runtime.local import LocalRuntime


def _runtime(*flags: str) -> LocalRuntime:
    args = build_parser().parse_args(["up", "--model", "/m", "--engine-port", "9100", *flags])
    return LocalRuntime(platform_settings(args), home=Path("/nowhere"))


def test_pd_flags_plan_prefill_and_decode_tasks_on_distinct_ports() -> None:
    plan = _runtime("--mode", "pd", "--prefill", "2", "--decode", "1").plan(Path("/m"))
    tasks = [t for job in plan.jobs for t in job.tasks]
    assert [(t.role.value, t.rank) for t in tasks] == [("prefill", 0), ("prefill", 1),
                                                      ("decode", 0)]
    assert len({t.port for t in tasks}) == 3
    assert all(t.argv[:2] == ("moeflow", "engine") for t in tasks)


def test_local_argv_equals_the_pod_argv_but_for_host_and_port() -> None:
    local = _runtime("--instances", "2").plan(Path("/m"))
    cluster = plan_model("m", parse_model_spec({
        "source": {"uri": "file:///m"}, "roles": {"colocated": {"replicas": 2}}}),
        model_path="/m")

    def strip(argv: tuple[str, ...]) -> list[str]:
        out, skip = [], False
        for a in argv:
            if skip:
                skip = False
            elif a in ("--host", "--port"):
                skip = True
            else:
                out.append(a)
        return out

    assert [strip(t.argv) for j in local.jobs for t in j.tasks] == [
        strip(t.argv) for j in cluster.jobs for t in j.tasks
    ]


def test_the_scaler_plans_every_replica_without_touching_the_settings() -> None:
    runtime = _runtime("--instances", "1")
    wide = runtime.plan(Path("/m"), instances=3)
    assert [t.port for j in wide.jobs for t in j.tasks] == [9100, 9101, 9102]
    assert runtime.settings.instances == 1
    assert len(runtime.plan(Path("/m")).jobs[0].tasks) == 1


def test_shared_memory_is_a_single_host_transport() -> None:
    spec = {"source": {"uri": "file:///m"}, "mode": "pd-disaggregated",
            "transport": {"kind": "shm"}}
    with pytest.raises(SpecError, match="shm only connects processes in one pod"):
        parse_model_spec(spec)
    assert _runtime("--mode", "pd").model_spec(Path("/m")).transport.kind.value == "shm"
