"""The one exception hierarchy of `moeflow.xccl`.

Every failure a caller can act on is an `XcclError`; backends translate their own failures
(`OSError` from sockets and files, `redis.exceptions.*`) into these at the point where they occur,
so the engine never catches backend-specific types. Argument errors that are programming mistakes
(bad names, negative timeouts, unsupported dtypes) stay `ValueError`/`TypeError`.
"""

from __future__ import annotations


class XcclError(Exception):
    """Base class of every transport failure."""


class XcclTimeout(XcclError, TimeoutError):
    """The operation did not complete within its `timeout_s` (the peer may be slow or absent)."""


class PeerGone(XcclError):
    """The peer endpoint was seen alive and has since vanished (closed, killed or crashed)."""

    def __init__(self, peer: str, detail: str) -> None:
        super().__init__(f"peer {peer!r} is gone: {detail}")
        self.peer = peer


class TransportClosed(XcclError):
    """This endpoint was closed; create a new one to communicate again."""


class RankInUse(XcclError):
    """Another live endpoint already holds this (group, rank)."""


class FrameError(XcclError):
    """A frame is malformed, of an unknown version, or fails its checksum."""


class MessageLost(XcclError):
    """A message was announced but its payload is gone (TTL expired or segment removed)."""


class PayloadTooLarge(XcclError, ValueError):
    """One message is bigger than the sender may ever buffer (shm: `ShmConfig.max_pool_bytes`).

    Waiting cannot help: split the payload (the KV transfer sends one layer per message) or raise
    the limit."""


class BackendUnavailable(XcclError):
    """The medium itself failed: Redis unreachable, shared-memory directory unusable."""


class LocalRedisError(XcclError):
    """A private redis-server could not be started or did not become ready."""
