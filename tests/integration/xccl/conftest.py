"""Fixtures of the XCCL integration tests: a real redis-server, real /dev/shm, all backends.

`open_endpoint(rank)` opens an endpoint of the backend under test in a group unique to the test
and closes it afterwards; `leftovers()` lists what that group still holds in /dev/shm or Redis,
so tests can assert that closing cleans up; `spawn_echo_peer()` starts echo_peer.py as a real
child process. Liveness settings are shortened so that failure tests finish in about a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import torch

from moeflow.xccl import RedisConfig, ShmConfig, Transport, make_transport
from moeflow.xccl.memory import MemoryHub
from moeflow.xccl.redis_server import LocalRedis, start_local_redis
from moeflow.xccl.shm_names import parse_name, remove_stale

torch.set_num_threads(1)

SHM_DIR = Path("/dev/shm")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EchoPeer:
    """A running echo_peer.py child process."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    def next_line(self, timeout_s: float) -> str:
        """The child's next stdout line, or "" when none came within the timeout."""
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout_s):
                return ""
        return self.process.stdout.readline().strip()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture(scope="session")
def local_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with start_local_redis(tmp_path_factory.mktemp("redis"), port=free_port()) as server:
        yield server


@pytest.fixture(params=["shm", "redis", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def config(kind: str, request: pytest.FixtureRequest) -> ShmConfig | RedisConfig | MemoryHub:
    """The backend's settings; for "memory" the hub (one per test) plays that part."""
    if kind == "memory":
        return MemoryHub()
    if kind == "shm":
        return ShmConfig(shm_dir=SHM_DIR, close_linger_s=1.0)
    server: LocalRedis = request.getfixturevalue("local_redis")
    return RedisConfig(url=server.url, liveness_ttl_s=1.0, poll_interval_s=0.1)


@pytest.fixture
def group() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def open_endpoint(
    group: str, config: ShmConfig | RedisConfig | MemoryHub
) -> Iterator[Callable[[str], Transport]]:
    opened: list[Transport] = []

    def _open(rank: str) -> Transport:
        if isinstance(config, MemoryHub):
            endpoint = make_transport("memory", group, rank, memory_hub=config)
        elif isinstance(config, ShmConfig):
            endpoint = make_transport("shm", group, rank, shm_config=config)
        else:
            endpoint = make_transport("redis", group, rank, redis_config=config)
        opened.append(endpoint)
        return endpoint

    yield _open
    for endpoint in opened:
        endpoint.close()


@pytest.fixture
def spawn_echo_peer(
    kind: str, group: str, config: ShmConfig | RedisConfig | MemoryHub
) -> Iterator[Callable[[], EchoPeer]]:
    if isinstance(config, MemoryHub):
        raise AssertionError("the memory backend joins endpoints of one process only")
    children: list[EchoPeer] = []

    def _spawn() -> EchoPeer:
        fields = {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()
        }
        script = Path(__file__).with_name("echo_peer.py")
        # The child sees the same import path as pytest (which adds services/ and operator/).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        process = subprocess.Popen(
            [sys.executable, str(script), kind, group, json.dumps(fields)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        children.append(EchoPeer(process))
        return children[-1]

    yield _spawn
    for child in children:
        child.kill()


@pytest.fixture
def leftovers(
    kind: str, group: str, config: ShmConfig | RedisConfig | MemoryHub
) -> Callable[[], list[str]]:
    """What the test's group still holds: /dev/shm files, Redis keys or hub entries."""

    def _list() -> list[str]:
        if isinstance(config, MemoryHub):
            return config.contents(group)
        if isinstance(config, ShmConfig):
            names = [p.name for p in SHM_DIR.iterdir()]
            return sorted(n for n in names if (parse_name(n) or ("",))[0] == group)
        client = redis.Redis.from_url(config.url)
        try:
            pattern = f"xccl:{quote(group, safe='-_.')}:*"
            return sorted(k.decode() for k in client.scan_iter(match=pattern))
        finally:
            client.close()

    return _list


@pytest.fixture
def remove_dead(kind: str, group: str) -> Callable[[], None]:
    """Clear what killed processes of the group left: shm needs a sweep, Redis keys expire."""

    def _remove() -> None:
        if kind == "shm":
            remove_stale(SHM_DIR, group)

    return _remove
