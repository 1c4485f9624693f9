"""Config validation and `make_transport` argument checks (nothing is opened)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeflow.xccl import RedisConfig, ShmConfig, make_transport
from moeflow.xccl.base import Backoff, deadline_after
from moeflow.xccl.memory import MemoryHub

pytestmark = pytest.mark.timeout(30)  # a hang guard; 2 s tripped on a loaded 2-core box


def test_defaults_are_valid() -> None:
    assert ShmConfig().shm_dir == Path("/dev/shm")
    assert RedisConfig(url="redis://127.0.0.1:6379/0").chunk_num_bytes == 4 << 20
    assert RedisConfig(url="unix:///tmp/r.sock?db=2").url.startswith("unix://")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ShmConfig(shm_dir=Path("relative")), "absolute"),
        (lambda: ShmConfig(inline_max_bytes=1 << 20), "inline_max_bytes"),
        (lambda: ShmConfig(max_pool_bytes=1, min_segment_bytes=4096), "max_pool_bytes"),
        (lambda: RedisConfig(url="http://x"), "redis://"),
        (lambda: RedisConfig(url="redis://x", chunk_num_bytes=10), "chunk_num_bytes"),
        (lambda: RedisConfig(url="redis://x", poll_interval_s=5.0), "poll_interval_s"),
        (lambda: RedisConfig(url="redis://x", socket_timeout_s=0.1), "socket_timeout_s"),
    ],
)
def test_invalid_configs_name_the_field(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_make_transport_rejects_inconsistent_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        make_transport("redis", "g", "r")
    with pytest.raises(ValueError, match="exactly one"):
        make_transport(
            "redis", "g", "r", redis_url="redis://x", redis_config=RedisConfig(url="redis://x")
        )
    with pytest.raises(ValueError, match="drop them"):
        make_transport("shm", "g", "r", redis_url="redis://x")
    with pytest.raises(ValueError, match="drop it"):
        make_transport("shm", "g", "r", memory_hub=MemoryHub())
    with pytest.raises(ValueError, match="drop them"):
        make_transport("memory", "g", "r", shm_config=ShmConfig())
    with pytest.raises(ValueError, match="unknown transport kind"):
        make_transport("tcp", "g", "r")  # type: ignore[arg-type]


def test_timeouts_must_be_non_negative_numbers() -> None:
    for bad in (-1, float("nan"), None, "1"):
        with pytest.raises(ValueError, match="timeout_s"):
            deadline_after(bad)  # type: ignore[arg-type]


def test_backoff_never_sleeps_past_the_deadline() -> None:
    import time

    deadline = time.monotonic() + 0.01
    steps = 0
    while Backoff(min_s=0.001, max_s=0.004).sleep(deadline):
        steps += 1
    assert time.monotonic() >= deadline and steps >= 1
