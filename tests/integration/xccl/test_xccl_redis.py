"""What only the redis backend promises: chunking, TTLs, inbox cleanup, the private server."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from moeflow.xccl import BackendUnavailable, LocalRedisError, MessageLost, RedisConfig
from moeflow.xccl.redis_backend import RedisTransport
from moeflow.xccl.redis_server import LocalRedis, start_local_redis

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def group() -> str:
    return f"redis-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(local_redis: LocalRedis) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(local_redis.url)
    yield connection
    connection.close()


@pytest.fixture
def config(local_redis: LocalRedis) -> RedisConfig:
    return RedisConfig(
        url=local_redis.url,
        chunk_num_bytes=64 << 10,
        inline_max_bytes=4096,
        message_ttl_s=30,
        liveness_ttl_s=1.0,
        poll_interval_s=0.1,
    )


def keys_of(client: redis.Redis, group: str) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=f"xccl:{group}:*"))


def test_large_payloads_are_chunked_into_keys_that_expire(
    config: RedisConfig, client: redis.Redis, group: str
) -> None:
    with RedisTransport(group, "a", config) as a, RedisTransport(group, "b", config) as b:
        sent = torch.randn(1 << 18)  # 1 MiB = 16 chunks of 64 KiB
        a.send("b", "kv/1", [sent], timeout_s=5)
        data_keys = [k for k in keys_of(client, group) if ":d:" in k]
        assert len(data_keys) == 16
        queue = next(k for k in keys_of(client, group) if ":q:" in k)
        for key in [*data_keys, queue]:
            assert 0 < client.pttl(key) <= 30_000
        assert torch.equal(b.recv("a", "kv/1", timeout_s=5)[0], sent)
        assert not [k for k in keys_of(client, group) if ":d:" in k or ":q:" in k]


def test_closing_a_receiver_deletes_its_unconsumed_messages(
    config: RedisConfig, client: redis.Redis, group: str
) -> None:
    a, b = RedisTransport(group, "a", config), RedisTransport(group, "b", config)
    for i in range(3):
        a.send("b", f"t{i}", [torch.zeros(100_000)], timeout_s=5)
    a.send("b", "small", [torch.zeros(3)], timeout_s=5)
    b.close()
    a.close()
    assert keys_of(client, group) == []


def test_a_message_whose_chunk_expired_raises_message_lost(
    config: RedisConfig, client: redis.Redis, group: str
) -> None:
    with RedisTransport(group, "a", config) as a, RedisTransport(group, "b", config) as b:
        a.send("b", "t", [torch.zeros(200_000)], timeout_s=5)
        client.delete(next(k for k in keys_of(client, group) if ":d:" in k and k.endswith(":1")))
        with pytest.raises(MessageLost, match="chunk 1"):
            b.recv("a", "t", timeout_s=5)
        a.send("b", "t", [torch.ones(200_000)], timeout_s=5)  # the connection is still usable
        assert torch.equal(b.recv("a", "t", timeout_s=5)[0], torch.ones(200_000))


def test_the_heartbeat_of_a_dead_predecessor_is_waited_out(
    config: RedisConfig, client: redis.Redis, group: str
) -> None:
    client.set(f"xccl:{group}:alive:a", "dead-instance", px=300)  # a killed endpoint's heartbeat
    start = time.monotonic()
    with RedisTransport(group, "a", config):
        assert 0.2 < time.monotonic() - start < 1.5


def test_unix_socket_server_and_url(group: str) -> None:
    with tempfile.TemporaryDirectory(prefix="xr-") as tmp:
        with start_local_redis(Path(tmp)) as server:
            assert server.url.startswith("unix://")
            config = RedisConfig(url=server.url, chunk_num_bytes=64 << 10)
            with RedisTransport(group, "a", config) as a, RedisTransport(group, "b", config) as b:
                sent = torch.randn(100_000)
                a.send("b", "t", [sent], timeout_s=5)
                assert torch.equal(b.recv("a", "t", timeout_s=5)[0], sent)
        assert server.process.poll() is not None
        server.stop()  # idempotent


def test_a_stopped_server_surfaces_as_backend_unavailable(group: str, tmp_path: Path) -> None:
    server = start_local_redis(Path(tempfile.mkdtemp(prefix="xr-")))
    endpoint = RedisTransport(group, "a", RedisConfig(url=server.url, socket_timeout_s=2.0))
    server.stop()
    try:
        with pytest.raises(BackendUnavailable):
            endpoint.send("b", "t", [torch.ones(1)], timeout_s=2)
    finally:
        endpoint.close()  # must not raise with the server gone


def test_a_missing_redis_server_binary_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(LocalRedisError, match="apt-get install redis-server"):
        start_local_redis(tmp_path, executable="no-such-redis-server")
