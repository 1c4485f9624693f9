"""XCCL: the transport library that joins engine instances.

Point-to-point KV-block transfer (prefill -> decode) and all-to-all dispatch/combine for MoE
layers, behind one `Transport` protocol (base.py) with two real backends, shared memory on one
host (shm.py) and Redis across hosts (redis_backend.py), plus an in-process fake for tests
(memory.py). Build endpoints with `make_transport`.
May import only `moeflow.common` from the project (today: nothing).
"""

from moeflow.xccl.base import Transport
from moeflow.xccl.config import RedisConfig, ShmConfig
from moeflow.xccl.errors import (
    BackendUnavailable,
    FrameError,
    LocalRedisError,
    MessageLost,
    PayloadTooLarge,
    PeerGone,
    RankInUse,
    TransportClosed,
    XcclError,
    XcclTimeout,
)
from moeflow.xccl.factory import make_transport

__all__ = [
    "BackendUnavailable",
    "FrameError",
    "LocalRedisError",
    "MessageLost",
    "PayloadTooLarge",
    "PeerGone",
    "RankInUse",
    "RedisConfig",
    "ShmConfig",
    "Transport",
    "TransportClosed",
    "XcclError",
    "XcclTimeout",
    "make_transport",
]
