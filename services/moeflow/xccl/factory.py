"""`make_transport`: the one way callers build an XCCL endpoint.

The backend is chosen by `kind`, not by probing: "shm" for endpoints on one host (sharing
`shm_dir`), "redis" across hosts or pods, "memory" for endpoints inside one process (tests).
Redis is imported only when a redis endpoint is built, so shm-only processes never load it.
There is no private Redis per endpoint: peers must meet on one server, so the runtime starts
one (`redis_server.start_local_redis`) and passes its URL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from moeflow.xccl.base import Transport
from moeflow.xccl.config import RedisConfig, ShmConfig

if TYPE_CHECKING:
    from moeflow.xccl.memory import MemoryHub


def make_transport(
    kind: Literal["shm", "redis", "memory"],
    group: str,
    rank: str,
    *,
    redis_url: str | None = None,
    redis_password: str | None = None,
    shm_config: ShmConfig | None = None,
    redis_config: RedisConfig | None = None,
    memory_hub: MemoryHub | None = None,
) -> Transport:
    """Open the endpoint `rank` of `group` on the backend `kind`.

    For "redis", give `redis_url` (and `redis_password` when the URL has none) or a
    `redis_config` (which carries both), not both. Other kinds ignore `redis_password` (an
    engine passes what its environment holds, whatever the transport).
    For "memory", endpoints meet in `memory_hub` (default: one hub per process).
    Raises ValueError for inconsistent arguments and XcclError subclasses (`RankInUse`,
    `BackendUnavailable`) when the endpoint cannot be opened.
    """
    if kind == "memory":
        if redis_url is not None or redis_config is not None or shm_config is not None:
            raise ValueError("backend configs given for a memory transport: drop them")
        from moeflow.xccl.memory import MemoryTransport

        return MemoryTransport(group, rank, memory_hub)
    if memory_hub is not None:
        raise ValueError(f"memory_hub given for a {kind} transport: drop it")
    if kind == "shm":
        if redis_url is not None or redis_config is not None:
            raise ValueError("redis_url/redis_config given for an shm transport: drop them")
        from moeflow.xccl.shm import ShmTransport

        return ShmTransport(group, rank, shm_config)
    if kind == "redis":
        if shm_config is not None:
            raise ValueError("shm_config given for a redis transport: drop it")
        if (redis_url is None) == (redis_config is None):
            raise ValueError(
                "a redis transport needs exactly one of redis_url or redis_config; "
                "start a server with moeflow.xccl.redis_server.start_local_redis"
            )
        from moeflow.xccl.redis_backend import RedisTransport

        return RedisTransport(group, rank, redis_config or RedisConfig(
            url=str(redis_url), password=redis_password))
    raise ValueError(f"unknown transport kind {kind!r}: use 'shm', 'redis' or 'memory'")
