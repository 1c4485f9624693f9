"""Tenants and Redis auth in what the operator builds (pure builders, strict Kubernetes
schemas): a Model's gateway gets the tenants Secret as a refreshable file and the quota Redis
with its password by secretKeyRef, as the chart's shared gateway does; engines of a Model with
`transport.redisPasswordSecretRef` get MOEFLOW_REDIS_PASSWORD the same way; a warm Pod, which
cannot hold it, is never claimed for them."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from moeflow.controller.build_engine import build_pod, build_task
from moeflow.controller.build_gateway import build_model_children
from moeflow.controller.build_warm_pool import claim_refusal
from moeflow.controller.settings import OperatorSettings
from moeflow.domain.plan import plan_model
from moeflow.domain.spec import JobSpec, SpecError, TaskSpec, parse_model_spec, parse_spec

PD = {"source": {"uri": "store://smol"}, "mode": "pd-disaggregated",
      "transport": {"redisUrl": "redis://moeflow-redis.ns.svc:6379/0",
                    "redisPasswordSecretRef": {"name": "moeflow-redis-auth"}}}


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, "1.37.0", strict=True)


def gateway_pod(settings: OperatorSettings) -> dict[str, Any]:
    plan = plan_model("m", parse_model_spec({"source": {"uri": "store://smol"}}),
                      namespace="ns")
    (deployment,) = [c for c in build_model_children(plan, "ns", settings)
                     if c["kind"] == "Deployment"]
    validate(deployment)
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def test_a_models_gateway_gets_the_tenants_file_and_the_quota_redis_with_its_password(
        ) -> None:
    settings = OperatorSettings(
        gateway_tenants_secret="moeflow-tenants", gateway_tenants_secret_key="t.yaml",
        quota_redis_url="redis://moeflow-redis.moeflow.svc:6379/0",
        quota_redis_password_secret="moeflow-redis-auth", quota_on_redis_failure="closed")
    pod = gateway_pod(settings)
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MOEFLOW_GATEWAY_TENANTS_FILE"]["value"] == "/etc/moeflow/tenants/t.yaml"
    assert env["MOEFLOW_GATEWAY_QUOTA_REDIS_URL"]["value"] == (
        "redis://moeflow-redis.moeflow.svc:6379/0")
    assert env["MOEFLOW_REDIS_PASSWORD"] == {"name": "MOEFLOW_REDIS_PASSWORD", "valueFrom": {
        "secretKeyRef": {"name": "moeflow-redis-auth", "key": "password"}}}
    assert env["MOEFLOW_GATEWAY_QUOTA_ON_REDIS_FAILURE"]["value"] == "closed"
    # the whole Secret as a directory (a subPath mount would never see a rotation)
    assert container["volumeMounts"] == [
        {"name": "tenants", "mountPath": "/etc/moeflow/tenants", "readOnly": True}]
    (volume,) = pod["volumes"]
    assert volume["secret"]["secretName"] == "moeflow-tenants"
    assert "optional" not in volume["secret"]  # no gateway without its keys
    assert all("value" not in e or "PASSWORD" not in e["name"] for e in container["env"])


def test_without_those_settings_the_gateway_is_as_before() -> None:
    pod = gateway_pod(OperatorSettings())
    (container,) = pod["containers"]
    assert [e["name"] for e in container["env"]] == ["MOEFLOW_INTERNAL_TOKEN"]
    assert "volumes" not in pod and "volumeMounts" not in container
    # a Redis without a password Secret: the URL, no password entry
    env = [e["name"] for e in gateway_pod(OperatorSettings(
        quota_redis_url="redis://r:6379/0"))["containers"][0]["env"]]
    assert "MOEFLOW_GATEWAY_QUOTA_REDIS_URL" in env and "MOEFLOW_REDIS_PASSWORD" not in env


def test_operator_settings_come_from_the_environment_and_are_checked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFLOW_OPERATOR_GATEWAY_TENANTS_SECRET", "tenants")
    monkeypatch.setenv("MOEFLOW_OPERATOR_QUOTA_REDIS_PASSWORD_SECRET", "auth")
    settings = OperatorSettings()
    assert (settings.gateway_tenants_secret, settings.quota_redis_password_secret) == (
        "tenants", "auth")
    with pytest.raises(ValidationError, match="quota_redis_url"):
        OperatorSettings(quota_redis_url="http://r:6379")
    with pytest.raises(ValidationError, match="quota_on_redis_failure"):
        OperatorSettings(quota_on_redis_failure="maybe")


def engine_pods(spec: dict[str, Any]) -> list[dict[str, Any]]:
    plan = plan_model("m", parse_model_spec(spec), namespace="ns")
    pods = []
    for child in build_model_children(plan, "ns", OperatorSettings()):
        if child["kind"] != "RoleGroup":
            continue
        job = parse_spec(JobSpec, child["spec"])
        task = parse_spec(TaskSpec, build_task(child["metadata"]["name"], "ns", job, 0)["spec"])
        pods.append(build_pod(f"{child['metadata']['name']}-0", "ns", task,
                              OperatorSettings()))
    return pods


def test_engines_get_the_redis_password_by_secret_key_ref() -> None:
    pods = engine_pods(PD)
    assert len(pods) == 2  # prefill, decode
    for pod in pods:
        validate(pod)
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["MOEFLOW_REDIS_URL"]["value"] == "redis://moeflow-redis.ns.svc:6379/0"
        assert env["MOEFLOW_REDIS_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": "moeflow-redis-auth", "key": "password"}}
    without = engine_pods({**PD, "transport": {"redisUrl": "redis://r:6379/0"}})
    assert all("MOEFLOW_REDIS_PASSWORD" not in {e["name"] for e in p["spec"]["containers"][0]
                                                ["env"]} for p in without)


@pytest.mark.parametrize(("spec", "message"), [
    ({"source": {"uri": "store://smol"},
      "transport": {"redisPasswordSecretRef": {"name": "auth"}}},
     "only the redis transport uses it"),
    ({**PD, "env": [{"name": "MOEFLOW_REDIS_PASSWORD", "value": "x"}]},
     "set by the operator"),
    ({**PD, "transport": {"redisUrl": "redis://r:6379/0",
                          "redisPasswordSecretRef": {"name": ""}}}, "name"),
])
def test_a_misplaced_password_reference_is_a_clear_error(spec: dict[str, Any],
                                                        message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_model_spec(spec)


def test_a_warm_pod_is_never_claimed_for_engines_that_need_the_redis_password() -> None:
    settings = OperatorSettings()
    task = parse_spec(TaskSpec, {
        "model": "m", "roleGroup": "m-prefill", "role": "prefill", "rank": 0,
        "template": {"image": settings.image, "source": {"uri": "store://tiny"},
                     "modelPath": f"{settings.model_mount_path}/tiny",
                     "port": settings.engine_port,
                     "transport": {"kind": "redis", "redisUrl": "redis://r:6379/0"}}})
    assert claim_refusal(task) is None
    with_password = task.model_copy(update={"template": task.template.model_copy(update={
        "transport": task.template.transport.model_copy(update={
            "redis_password_secret_ref": {"name": "auth", "key": "password"}})})})
    refusal = claim_refusal(with_password)
    assert refusal is not None and "Redis password" in refusal
