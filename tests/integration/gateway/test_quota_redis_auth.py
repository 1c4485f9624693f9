"""The quota store against a real Redis with `requirepass`, configured as on a cluster: the URL
in MOEFLOW_GATEWAY_QUOTA_REDIS_URL and the password in MOEFLOW_REDIS_PASSWORD (a secretKeyRef
in the chart and in the operator's gateways). The right password: counters in Redis, shared
by two stores (two replicas); a wrong one: one clear error line (never the password), then the
configured failure policy (``open``: this replica's counters; ``closed``: 503)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from moeflow.gateway.quota import QuotaExceededError, QuotaUnavailableError, quota_from_settings
from moeflow.gateway.settings import GatewaySettings
from moeflow.gateway.tenants import Limits, Tenant
from moeflow.xccl.redis_server import LocalRedis, start_local_redis
from tests.platform_process import free_port

PASSWORD = "quota p@ss:/word"
TENANT = Tenant("team-a", Limits(requests_per_minute=3))


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    folder: Path = tmp_path_factory.mktemp("quota-auth")
    with start_local_redis(folder, port=free_port(), requirepass=PASSWORD) as server:
        yield server


def settings_from_env(monkeypatch: pytest.MonkeyPatch, url: str, password: str,
                      on_failure: str = "open") -> GatewaySettings:
    monkeypatch.setenv("MOEFLOW_GATEWAY_QUOTA_REDIS_URL", url)
    monkeypatch.setenv("MOEFLOW_REDIS_PASSWORD", password)
    monkeypatch.setenv("MOEFLOW_GATEWAY_QUOTA_ON_REDIS_FAILURE", on_failure)
    monkeypatch.setenv("MOEFLOW_GATEWAY_QUOTA_KEY_PREFIX", f"auth-{uuid.uuid4().hex[:8]}:")
    return GatewaySettings()


async def test_the_password_from_the_environment_shares_counters_in_redis(
        locked_redis: LocalRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_env(monkeypatch, locked_redis.url, PASSWORD)
    replicas = [quota_from_settings(settings) for _ in range(2)]
    try:
        for i in range(3):  # the limit, spread over both replicas
            lease = await replicas[i % 2].admit(TENANT)
            assert lease.backend == "redis"
            await replicas[i % 2].release(lease)
        with pytest.raises(QuotaExceededError, match="requests_per_minute"):
            await replicas[1].admit(TENANT)
        assert all(r.backend == "redis" for r in replicas)
    finally:
        for replica in replicas:
            await replica.aclose()
    client = redis.Redis.from_url(locked_redis.url, password=PASSWORD)
    try:
        assert int(client.get(f"{settings.quota_key_prefix}rpm:team-a") or 0) >= 3
    finally:
        client.close()


async def test_a_wrong_password_is_one_error_line_then_the_failure_policy(
        locked_redis: LocalRedis, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    wrong = "not-the-quota-password"
    quota = quota_from_settings(settings_from_env(monkeypatch, locked_redis.url, wrong))
    try:
        with caplog.at_level(logging.WARNING, logger="moeflow.gateway.quota"):
            lease = await quota.admit(TENANT)  # open: served on this replica's counters
        assert lease.backend == "local" and quota.backend == "local"
        (record,) = [r for r in caplog.records if r.name == "moeflow.gateway.quota"]
        line = record.getMessage()
        assert record.levelno == logging.ERROR and "\n" not in line
        assert line.startswith("quota store refused the password")
        assert "MOEFLOW_REDIS_PASSWORD" in line
        assert wrong not in line and PASSWORD not in line
    finally:
        await quota.aclose()

    closed = quota_from_settings(settings_from_env(monkeypatch, locked_redis.url, wrong,
                                                   on_failure="closed"))
    try:
        with pytest.raises(QuotaUnavailableError):
            await closed.admit(TENANT)
    finally:
        await closed.aclose()
