"""Tenants and Redis auth with the real operator on the emulated cluster, configured as the
chart configures it (MOEFLOW_OPERATOR_* variables): the PD example's gateway gets the tenants
Secret as a file and the quota Redis with its password by secretKeyRef; its engine Pods get the
password of `spec.transport.redisPasswordSecretRef` the same way; everything stays valid."""

from __future__ import annotations

from typing import Any

import pytest
from cluster_kit import Cluster, OperatorRunner, load_example, wait_for

from moeflow.domain import naming

TENANCY = {
    "MOEFLOW_OPERATOR_GATEWAY_TENANTS_SECRET": "moeflow-tenants",
    "MOEFLOW_OPERATOR_QUOTA_REDIS_URL": "redis://moeflow-redis.moeflow.svc.cluster.local:6379/0",
    "MOEFLOW_OPERATOR_QUOTA_REDIS_PASSWORD_SECRET": "moeflow-redis-auth",
    "MOEFLOW_OPERATOR_QUOTA_ON_REDIS_FAILURE": "closed",
}


def pod_specs(cluster: Cluster, model: str, kind: str) -> list[dict[str, Any]]:
    if kind == "pods":
        return [p["spec"] for p in cluster.objects("v1/pods", {naming.LABEL_MODEL: model})]
    return [d["spec"]["template"]["spec"]
            for d in cluster.objects("apps/v1/deployments", {naming.LABEL_MODEL: model})]


def env_of(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (container,) = spec["containers"]
    return {e["name"]: e for e in container.get("env") or []}


async def test_models_gateway_and_engines_get_tenants_and_redis_auth(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TENANCY.items():
        monkeypatch.setenv(name, value)
    operator = await OperatorRunner().start()  # reads its settings from that environment
    try:
        model = load_example("model-pd-disaggregated.yaml")
        name = model["metadata"]["name"]
        await cluster.apply(model)
        await wait_for(lambda: len(pod_specs(cluster, name, "pods")) == 3
                       and len(pod_specs(cluster, name, "deployments")) == 1,
                       what="prefill, 2 decode Pods and the gateway")
        (gateway,) = pod_specs(cluster, name, "deployments")
        env = env_of(gateway)
        assert env["MOEFLOW_GATEWAY_TENANTS_FILE"]["value"] == (
            "/etc/moeflow/tenants/tenants.yaml")
        assert env["MOEFLOW_GATEWAY_QUOTA_REDIS_URL"]["value"] == (
            TENANCY["MOEFLOW_OPERATOR_QUOTA_REDIS_URL"])
        assert env["MOEFLOW_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "moeflow-redis-auth", "key": "password"}
        assert env["MOEFLOW_GATEWAY_QUOTA_ON_REDIS_FAILURE"]["value"] == "closed"
        (volume,) = gateway["volumes"]
        assert volume["secret"]["secretName"] == "moeflow-tenants"
        for engine in pod_specs(cluster, name, "pods"):
            engine_env = env_of(engine)
            assert engine_env["MOEFLOW_REDIS_URL"]["value"] == "redis://moeflow-redis:6379/0"
            # from the example's spec.transport.redisPasswordSecretRef
            assert engine_env["MOEFLOW_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                "name": "moeflow-redis-auth", "key": "password"}
        assert cluster.validate_everything() > 0
    finally:
        await operator.stop()
