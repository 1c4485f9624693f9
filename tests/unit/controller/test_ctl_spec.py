"""moeflow.domain.spec: typed specs parsed from CR dicts, errors that name field and fix."""

from __future__ import annotations

import pytest

from moeflow.domain.roles import Mode, Role
from moeflow.domain.spec import (
    JobSpec,
    RequestSpec,
    SpecError,
    TransportKind,
    check_model_name,
    parse_model_spec,
    parse_spec,
)

SOURCE = {"source": {"uri": "store://smollm2-135m-instruct"}}


def test_a_minimal_model_gets_the_defaults() -> None:
    spec = parse_model_spec(SOURCE)
    assert spec.mode is Mode.COLOCATED
    assert spec.role_names == (Role.COLOCATED,)
    assert spec.role(Role.COLOCATED).replicas == 1
    assert spec.transport_kind is TransportKind.SHM
    assert spec.devices_per_instance == 0 and spec.gateway.replicas == 1
    assert spec.dram_preload is False
    assert parse_model_spec({**SOURCE, "dramPreload": True}).dram_preload is True


def test_camel_case_wire_names_and_int_quantities() -> None:
    spec = parse_model_spec({**SOURCE, "mode": "pd-disaggregated",
                             "roles": {"decode": {"replicas": 3, "maxReplicas": 4}},
                             "transport": {"redisUrl": "redis://r:6379/0"},
                             "devicesPerInstance": 2, "resources": {"cpu": 2, "memory": "4Gi"}})
    assert spec.role(Role.DECODE).max_replicas == 4
    assert spec.role(Role.PREFILL).replicas == 1  # a role of the mode left out
    assert spec.transport_kind is TransportKind.REDIS
    assert spec.resources.cpu == "2"


@pytest.mark.parametrize("raw, expected", [
    ({}, "spec.source: is required; fix: set it"),
    ({**SOURCE, "mode": "sharded"}, "spec.mode: 'sharded' is not allowed; fix: use one of"),
    ({**SOURCE, "roles": {"colocated": {"replicas": -1}}},
     "spec.roles.colocated.replicas: Input should be greater than or equal to 0"),
    ({**SOURCE, "roles": {"colocated": {"minReplicas": 3, "maxReplicas": 2}}},
     "spec.roles.colocated: minReplicas (3) must be <= maxReplicas (2); fix: lower minReplicas"),
    ({**SOURCE, "roles": {"colocated": {"replicas": 5, "maxReplicas": 2}}},
     "replicas (5) must be <= maxReplicas (2)"),
    ({**SOURCE, "roles": {"expert": {}}},
     "spec.roles.expert: role 'expert' is not used in mode 'colocated'"),
    ({**SOURCE, "mode": "pd-disaggregated"},
     "spec.transport.redisUrl: is required when the transport is redis"),
    ({**SOURCE, "mode": "attention-expert-disaggregated", "transport": {"kind": "shm"}},
     "spec.transport.kind: shm only connects processes in one pod"),
    ({"source": {"uri": "s3://bucket/m"}}, "is not a supported source; fix: use store://"),
    ({**SOURCE, "gpus": 1}, "spec.gpus: unknown field; fix: remove it"),
])
def test_errors_name_the_field_and_the_fix(raw: dict[str, object], expected: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_model_spec(raw)
    assert expected in str(e.value)
    assert all("fix" in problem for problem in e.value.problems)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(SpecError) as e:
        parse_model_spec({"mode": "x", "devicesPerInstance": -1})
    assert len(e.value.problems) == 3


@pytest.mark.parametrize("name", ["a" * 41, "Upper", "1starts-with-digit", "ends-", "dots.x"])
def test_model_names_must_fit_child_dns_labels(name: str) -> None:
    with pytest.raises(SpecError, match="metadata.name"):
        check_model_name(name)


def test_model_name_of_40_chars_is_fine() -> None:
    check_model_name("a" * 40)


def test_operator_made_and_request_specs() -> None:
    job = parse_spec(JobSpec, {"model": "m", "role": "decode", "replicas": 2, "template": {
        "image": "i", "source": {"uri": "pvc://claim/sub"}, "modelPath": "/models/m"}})
    assert job.template.port == 8001 and job.template.source.location == "claim/sub"
    request = parse_spec(RequestSpec, {"model": "m", "input": {"name": "cm"}})
    assert request.input.key == "prompts.jsonl" and request.parallelism == 4
    with pytest.raises(SpecError, match=r"spec\.endpoint"):
        parse_spec(RequestSpec, {"model": "m", "input": {"name": "cm"}, "endpoint": "ftp://x"})
