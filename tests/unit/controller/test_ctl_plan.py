"""moeflow.domain.plan: the desired Jobs, Tasks and gateway of a Model, as data."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moeflow.cli import build_parser
from moeflow.domain.plan import model_path_for, plan_model
from moeflow.domain.roles import Role
from moeflow.domain.spec import Source, parse_model_spec

PD = parse_model_spec({"source": {"uri": "store://smollm2-135m-instruct"},
                       "mode": "pd-disaggregated", "transport": {"redisUrl": "redis://r"},
                       "roles": {"prefill": {"replicas": 1}, "decode": {"replicas": 2}}})


def test_pd_plan_has_one_job_per_role_with_dense_ranks() -> None:
    plan = plan_model("m", PD, namespace="ns")
    assert plan.roles == (Role.PREFILL, Role.DECODE)
    assert [(j.name, j.replicas) for j in plan.jobs] == [("m-prefill", 1), ("m-decode", 2)]
    assert [t.name for t in plan.job(Role.DECODE).tasks] == ["m-decode-0", "m-decode-1"]
    assert plan.num_instances == 3
    assert plan.job(Role.DECODE).tasks[1].argv == (
        "moeflow", "engine", "--model", "/models/smollm2-135m-instruct",
        "--served-model-name", "m", "--role", "decode", "--rank", "1",
        "--host", "0.0.0.0", "--port", "8001")
    assert plan.gateway.argv == (
        "moeflow", "gateway", "--host", "0.0.0.0", "--port", "8000", "--discovery",
        "kubernetes", "--namespace", "ns", "--served-model-name", "m")


def test_each_mode_plans_its_roles() -> None:
    for mode, roles in [("colocated", (Role.COLOCATED,)),
                        ("attention-expert-disaggregated", (Role.ATTENTION, Role.EXPERT))]:
        spec = parse_model_spec({"source": {"uri": "store://x"}, "mode": mode,
                                 "transport": {"redisUrl": "redis://r"}})
        assert plan_model("x", spec).roles == roles


def test_attention_and_expert_instances_learn_the_size_of_the_other_side() -> None:
    spec = parse_model_spec({"source": {"uri": "store://x"},
                             "mode": "attention-expert-disaggregated",
                             "transport": {"redisUrl": "redis://r"},
                             "roles": {"attention": {"replicas": 2}, "expert": {"replicas": 3}}})
    plan = plan_model("x", spec)
    attention = plan.job(Role.ATTENTION).tasks[1].argv
    expert = plan.job(Role.EXPERT).tasks[2].argv
    assert attention[-2:] == ("--num-expert-instances", "3")
    assert expert[-4:] == ("--num-expert-instances", "3", "--num-attention-instances", "2")
    assert "--num-expert-instances" not in PD.model_dump_json()
    assert all("--num-expert-instances" not in t.argv for j in plan_model("m", PD).jobs
               for t in j.tasks)


def test_only_attention_expert_mode_plans_a_balancer_that_knows_the_expert_fleet() -> None:
    spec = parse_model_spec({"source": {"uri": "store://x"},
                             "mode": "attention-expert-disaggregated",
                             "transport": {"redisUrl": "redis://r"},
                             "roles": {"attention": {"replicas": 2}, "expert": {"replicas": 3}}})
    balancer = plan_model("x", spec, namespace="ns").balancer
    assert balancer is not None and balancer.name == "x-balancer"
    assert balancer.argv == (
        "moeflow", "balancer", "--discovery", "kubernetes", "--namespace", "ns",
        "--served-model-name", "x", "--num-expert-instances", "3")
    args = build_parser().parse_args(list(balancer.argv[1:]))
    assert (args.command, args.discovery, args.namespace, args.served_model_name,
            args.num_expert_instances) == ("balancer", "kubernetes", "ns", "x", 3)
    local = plan_model("x", spec, discovery="static").balancer
    assert local is not None and "--namespace" not in local.argv
    assert plan_model("m", PD).balancer is None
    colocated = parse_model_spec({"source": {"uri": "store://x"}})
    assert plan_model("m", colocated).balancer is None


def test_local_runtime_gets_unique_ports_and_its_own_paths() -> None:
    plan = plan_model("m", PD, model_path="/home/u/.cache/moeflow/models/m", host="127.0.0.1",
                      engine_port=9001, gateway_port=9000, unique_ports=True,
                      discovery="static")
    ports = [t.port for j in plan.jobs for t in j.tasks]
    assert ports == [9001, 9002, 9003]
    assert plan.job(Role.PREFILL).tasks[0].argv[3] == "/home/u/.cache/moeflow/models/m"
    assert "--namespace" not in plan.gateway.argv and plan.gateway.port == 9000
    chosen = plan_model("m", PD, host="127.0.0.1", unique_ports=True, engine_ports=[7, 5, 6],
                        discovery="static")
    assert [t.port for j in chosen.jobs for t in j.tasks] == [7, 5, 6]
    assert "--port" in chosen.job(Role.DECODE).tasks[1].argv
    with pytest.raises(ValueError, match="2 engine ports for 3 instances"):
        plan_model("m", PD, engine_ports=[1, 2])


def test_free_ports_are_distinct() -> None:
    from moeflow.runtime.local import free_ports

    ports = free_ports("127.0.0.1", 16)
    assert len(set(ports)) == 16


def test_scaled_to_zero_role_has_no_tasks() -> None:
    spec = parse_model_spec({"source": {"uri": "store://x"},
                             "roles": {"colocated": {"replicas": 0}}})
    assert plan_model("x", spec).jobs[0].tasks == ()


def test_model_paths_per_source() -> None:
    assert model_path_for("m", Source(uri="store://smol")) == "/models/smol"
    assert model_path_for("m", Source(uri="pvc://claim/a/b"), "/w") == "/w/m"
    assert model_path_for("m", Source(uri="file:///data/m")) == "/models/m"


def test_spec_and_plan_import_neither_kopf_nor_kubernetes() -> None:
    code = ("import sys, moeflow.domain.plan, moeflow.domain.spec, "
            "moeflow.controller.status, moeflow.controller.build_gateway; "
            "bad = [m for m in ('kopf', 'kubernetes') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
