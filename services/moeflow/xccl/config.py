"""Typed, validated configuration of the XCCL backends (frozen; built once, passed down).

Pure data: importing this module imports neither redis nor torch, so callers can build configs
for a backend they never load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

_MIB = 1 << 20


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True, slots=True)
class ShmConfig:
    """Same-host backend: shared-memory segments plus a Unix datagram socket per endpoint."""

    shm_dir: Path = Path("/dev/shm")
    """Directory on a tmpfs shared by all endpoints of the group (in Kubernetes: a shared
    emptyDir with medium Memory, or a hostPath, mounted at the same path in every pod)."""
    inline_max_bytes: int = 64 << 10
    """Payloads up to this size travel inside the notification datagram instead of a segment."""
    min_segment_bytes: int = 256 << 10
    """Smallest segment capacity; larger payloads round up by at most 1/8 to a size class.
    Segment pages are reserved when the segment is created, so a full shm_dir fails cleanly."""
    max_pool_bytes: int = 2048 * _MIB
    """Capacity of all segments one sender keeps; beyond it `send` waits for receivers to
    release segments (and frees idle ones), up to its timeout."""
    max_idle_pool_bytes: int = 512 * _MIB
    """Free segments kept for reuse; the excess is unlinked when released segments are swept."""
    max_cached_mappings: int = 64
    """Peer segments a receiver keeps mapped (reuse avoids mmap and page-fault costs)."""
    liveness_interval_s: float = 0.05
    """How often a waiting `recv`/`send` probes whether its peer is still alive."""
    close_linger_s: float = 2.0
    """On close, how long to wait for receivers to map segments of messages already sent."""
    checksum: bool = False
    """Compute and verify a CRC-32 of every payload (costs about 1 GB/s of CPU)."""

    def __post_init__(self) -> None:
        _require(self.shm_dir.is_absolute(), f"shm_dir must be absolute, got {self.shm_dir}")
        _require(
            0 <= self.inline_max_bytes <= 128 << 10,
            f"inline_max_bytes={self.inline_max_bytes} must be in [0, 128 KiB]: it rides "
            "in one datagram",
        )
        _require(self.min_segment_bytes >= 4096, "min_segment_bytes must be at least 4096")
        _require(
            self.max_pool_bytes >= self.min_segment_bytes,
            f"max_pool_bytes={self.max_pool_bytes} < min_segment_bytes="
            f"{self.min_segment_bytes}: raise max_pool_bytes",
        )
        _require(
            0 <= self.max_idle_pool_bytes <= self.max_pool_bytes,
            "max_idle_pool_bytes must be in [0, max_pool_bytes]",
        )
        _require(self.max_cached_mappings >= 1, "max_cached_mappings must be >= 1")
        _require(self.liveness_interval_s > 0, "liveness_interval_s must be > 0")
        _require(self.close_linger_s >= 0, "close_linger_s must be >= 0")


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Cross-host backend: messages as chunked Redis keys announced on blocking lists."""

    url: str
    """redis://host:port/db, rediss://..., or unix:///path/redis.sock?db=N."""
    password: str | None = field(default=None, repr=False)
    """Password (`AUTH`) when the URL carries none; a password in the URL wins. Kept out of
    the URL so that it can come from a Secret (MOEFLOW_REDIS_PASSWORD) and never be logged."""
    chunk_num_bytes: int = 4 * _MIB
    """Payloads are split into values of this size and pipelined. Reads bypass redis-py's parser
    (redis_bulk.py), so bigger chunks cost nothing there; on the redis-py fallback (TLS) values
    of many MiB degrade sharply (measured in docs/benchmarks.md, XCCL): use 1 MiB with rediss://."""
    inline_max_bytes: int = 64 << 10
    """Payloads up to this size ride inside the notification itself (saves a round trip);
    larger ones go through the chunk keys, whose read path is several times faster."""
    message_ttl_s: float = 120.0
    """Every message key expires after this long, so a dead receiver leaks nothing."""
    liveness_ttl_s: float = 3.0
    """An endpoint's alive-key expires this long after its last heartbeat (sent every third of
    it); a killed peer is reported as gone at most this long (plus a poll) after it died."""
    poll_interval_s: float = 0.25
    """Slice of a blocking wait between liveness checks of the peer."""
    socket_timeout_s: float = 30.0
    """Bound on any single Redis round trip, so a frozen server cannot hang the caller."""
    checksum: bool = False
    """Compute and verify a CRC-32 of every payload."""

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        _require(
            scheme in ("redis", "rediss", "unix"),
            f"redis url {self.url!r} must start with redis://, rediss:// or unix://",
        )
        _require(self.chunk_num_bytes >= 4096, "chunk_num_bytes must be at least 4096")
        _require(
            0 <= self.inline_max_bytes <= self.chunk_num_bytes,
            "inline_max_bytes must be in [0, chunk_num_bytes]",
        )
        _require(self.message_ttl_s >= 1, "message_ttl_s must be >= 1")
        _require(self.liveness_ttl_s >= 0.3, "liveness_ttl_s must be >= 0.3")
        _require(
            0 < self.poll_interval_s <= self.liveness_ttl_s,
            "poll_interval_s must be in (0, liveness_ttl_s]",
        )
        _require(
            self.socket_timeout_s > self.poll_interval_s,
            f"socket_timeout_s={self.socket_timeout_s} must exceed poll_interval_s="
            f"{self.poll_interval_s}: blocking reads last up to one poll",
        )
