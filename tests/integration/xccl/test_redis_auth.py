"""Redis with `requirepass`, the password apart from the URL (MOEFLOW_REDIS_PASSWORD, what the
operator gives engines from `spec.transport.redisPasswordSecretRef`): the XCCL Redis transport
moves tensors both ways (the inline path and the bulk read path, which does its own AUTH); a
wrong or missing password fails at once with one clear line that never shows the password."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moeflow.engine.config import EngineOptions
from moeflow.xccl import BackendUnavailable, make_transport
from moeflow.xccl.redis_server import LocalRedis, start_local_redis
from tests.platform_process import free_port

PASSWORD = "s3cret: with spaces & @/ signs"  # nothing a URL could carry unquoted


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    folder: Path = tmp_path_factory.mktemp("redis-auth")
    with start_local_redis(folder, port=free_port(), requirepass=PASSWORD) as server:
        yield server


def options_from_env(monkeypatch: pytest.MonkeyPatch, url: str,
                     password: str | None) -> EngineOptions:
    """What an engine Pod builds: its settings from the environment the operator set."""
    monkeypatch.setenv("MOEFLOW_TRANSPORT", "redis")
    monkeypatch.setenv("MOEFLOW_REDIS_URL", url)
    if password is None:
        monkeypatch.delenv("MOEFLOW_REDIS_PASSWORD", raising=False)
    else:
        monkeypatch.setenv("MOEFLOW_REDIS_PASSWORD", password)
    return EngineOptions()


def test_the_password_from_the_environment_opens_the_transport_both_ways(
        locked_redis: LocalRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    options = options_from_env(monkeypatch, locked_redis.url, PASSWORD)
    assert options.redis_url is not None and PASSWORD not in options.redis_url
    assert PASSWORD not in repr(options)  # a SecretStr: never in logs or reprs
    group = f"auth-{uuid.uuid4().hex[:8]}"
    ends = [make_transport("redis", group, rank, redis_url=options.redis_url,
                           redis_password=options.redis_password_value)
            for rank in ("prefill-0", "decode-0")]
    try:
        small = torch.arange(16, dtype=torch.float32)
        big = torch.randn(256, 1024)  # 1 MiB: past the inline limit, read by the bulk path
        ends[0].send("decode-0", "kv", [small, big], timeout_s=10)
        got = ends[1].recv("prefill-0", "kv", timeout_s=10)
        assert torch.equal(got[0], small) and torch.equal(got[1], big)
        ends[1].send("prefill-0", "ack", [small], timeout_s=10)
        assert torch.equal(ends[0].recv("decode-0", "ack", timeout_s=10)[0], small)
    finally:
        for end in ends:
            end.close()
    # a child engine inherits the password itself, not the settings dump's mask
    env = options.as_env()
    assert env["MOEFLOW_REDIS_PASSWORD"] == env["MOEFLOW_ENGINE_REDIS_PASSWORD"] == PASSWORD


@pytest.mark.parametrize("password", ["not-the-password", None])
def test_a_wrong_or_missing_password_is_one_clear_line(
        locked_redis: LocalRedis, monkeypatch: pytest.MonkeyPatch,
        password: str | None) -> None:
    options = options_from_env(monkeypatch, locked_redis.url, password)
    with pytest.raises(BackendUnavailable) as caught:
        make_transport("redis", f"auth-{uuid.uuid4().hex[:8]}", "prefill-0",
                       redis_url=options.redis_url,
                       redis_password=options.redis_password_value)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("redis connect failed: authentication refused")
    assert "MOEFLOW_REDIS_PASSWORD" in message
    assert PASSWORD not in message and (password is None or password not in message)
