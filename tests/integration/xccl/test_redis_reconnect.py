"""Redis backend endpoints survive a restart of their redis-server (real server, kill -9).

A restarted server (no persistence) has lost every key: the endpoints' alive-keys and any
message in flight. The endpoints must reconnect by themselves, register again, and treat a peer
whose key is missing for a moment as "not registered yet" rather than "gone", so the first
messages after the restart go through; a peer that really closes is still reported gone.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis
import torch

from moeflow.xccl import RedisConfig, make_transport
from moeflow.xccl.errors import PeerGone
from moeflow.xccl.redis_server import start_local_redis
from tests.integration.xccl.conftest import free_port


def _alive_keys(url: str, group: str) -> set[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return set(client.scan_iter(match=f"xccl:{group}:alive:*"))
    finally:
        client.close()


def test_endpoints_reconnect_register_again_and_exchange_after_a_restart(
    tmp_path: Path,
) -> None:
    port, group = free_port(), f"reconnect-{uuid.uuid4().hex[:8]}"
    server = start_local_redis(tmp_path, port=port)
    config = RedisConfig(url=server.url, liveness_ttl_s=0.6, poll_interval_s=0.05)
    a = make_transport("redis", group, "a", redis_config=config)
    b = make_transport("redis", group, "b", redis_config=config)
    big = torch.arange(300_000, dtype=torch.float32)  # > inline_max_bytes: chunks, bulk reader
    small = torch.tensor([1, 2, 3])
    try:
        a.send("b", "kv", [big], timeout_s=5)
        assert torch.equal(b.recv("a", "kv", timeout_s=5)[0], big)  # b's bulk socket is open

        server.process.kill()  # SIGKILL: nothing saved, nothing handed over
        server.process.wait()
        server = start_local_redis(tmp_path, port=port)  # same port, empty
        assert _alive_keys(server.url, group) == set()

        # at once, before b has noticed anything: a must wait for b, not call it gone
        a.send("b", "kv", [big], timeout_s=10)
        assert torch.equal(b.recv("a", "kv", timeout_s=10)[0], big)  # stale bulk socket replaced
        b.send("a", "ack", [small], timeout_s=10)
        assert torch.equal(a.recv("b", "ack", timeout_s=10)[0], small)
        assert _alive_keys(server.url, group) == {
            f"xccl:{group}:alive:a".encode(), f"xccl:{group}:alive:b".encode()}

        b.close()  # a real departure is still seen as one
        started = time.monotonic()
        with pytest.raises(PeerGone):
            a.recv("b", "never", timeout_s=10)
        assert time.monotonic() - started < 5
    finally:
        a.close()
        b.close()
        server.stop()
