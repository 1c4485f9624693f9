"""Cross-host XCCL backend over Redis. The only module of the project that imports `redis`.

Keys, all under ``xccl:{group}`` (names percent-encoded, so ":" separates fields unambiguously):

    alive:{rank}                          the endpoint's heartbeat (PX liveness_ttl_s)
    q:{receiver}:{sender}:{tag}           a list of frame headers: the notification queue
    d:{sender}:{instance}:{seq}:{i}       payload chunk i of one message (PX message_ttl_s)

`send` writes every chunk and pushes the header in one pipelined round trip (payloads up to
`inline_max_bytes` ride inside the list element instead), checking in the same trip that the
receiver is alive. `recv` blocks on the one list of its (peer, tag) with BLPOP in slices of
`poll_interval_s`, checking the peer's heartbeat between slices, then fetches and deletes all
chunks in one pipelined GETDEL (Redis >= 6.2). Every key carries a TTL, so a receiver that dies
leaks nothing for longer than `message_ttl_s`. Redis failures surface as `BackendUnavailable`.

Reconnecting: redis-py retries a failed command on a new connection (about 5 s of backoff), so
an endpoint survives a Redis restart. The only state an endpoint keeps in Redis is its
alive-key; a restarted server (no persistence) has lost it, so every new connection re-creates
it unless another endpoint holds the rank (`_on_connect`, SET NX). When it had to be
re-created, the server lost everyone's keys: the endpoint forgets which peers it saw alive, so
a peer whose key is missing for a moment counts as "not registered yet" (waited for, within
the call's timeout) rather than "gone". Messages queued in the old server are lost with it
(their calls time out or fail); new ones flow as before.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from urllib.parse import quote

import numpy as np
import numpy.typing as npt
import redis
import torch

from moeflow.xccl.base import Backoff, EndpointBase
from moeflow.xccl.config import RedisConfig
from moeflow.xccl.errors import (
    BackendUnavailable,
    FrameError,
    MessageLost,
    PeerGone,
    RankInUse,
    TransportClosed,
    XcclTimeout,
)
from moeflow.xccl.messages import (
    FrameHeader,
    decode_header,
    encode_header,
    payload_checksum,
    verify_checksum,
)
from moeflow.xccl.redis_bulk import BulkConnection
from moeflow.xccl.tensors import as_bytes, layout_of, views_of_payload, write_payload

logger = logging.getLogger(__name__)

_MIN_BLOCK_S = 0.01  # BLPOP treats 0 as "forever": never send it
# Renew our heartbeat unless another instance holds the rank now (atomic on the server).
_RENEW_IF_OURS = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


def _q(name: str) -> str:
    return quote(name, safe="-_.")


def _as_bytes(value: object) -> bytes:
    # redis-py types replies as unions (str when decode_responses=True, which we never set).
    if not isinstance(value, bytes):
        raise FrameError(f"expected a bytes reply from redis, got {type(value).__name__}")
    return value


@contextlib.contextmanager
def _redis_errors(what: str) -> Iterator[None]:
    try:
        yield
    except redis.exceptions.AuthenticationError as exc:
        # a wrong or missing password: say where it comes from, never what it is
        raise BackendUnavailable(
            f"redis {what} failed: authentication refused ({exc}); the password comes from the"
            " URL or MOEFLOW_REDIS_PASSWORD") from exc
    except redis.exceptions.RedisError as exc:
        raise BackendUnavailable(f"redis {what} failed: {exc}") from exc


class RedisTransport(EndpointBase):
    """Endpoint of the Redis backend. See the module docstring."""

    def __init__(self, group: str, rank: str, config: RedisConfig) -> None:
        super().__init__(group, rank)
        self._config = config
        self._ns = f"xccl:{_q(group)}"
        self._instance = os.urandom(6).hex()
        self._seq = itertools.count()
        self._seen_alive: set[str] = set()
        self._ttl_ms = int(config.message_ttl_s * 1000)
        self._bulk: BulkConnection | None = None
        self._bulk_lock = threading.Lock()
        self._stop = threading.Event()
        self._is_registered = False
        with _redis_errors("connect"):
            # 1 MiB reads: the default 64 KiB makes the pure-Python parser copy big values often.
            self._client = redis.Redis.from_url(
                config.url,
                password=config.password,
                socket_timeout=config.socket_timeout_s,
                socket_read_size=1 << 20,
                socket_connect_timeout=config.socket_timeout_s,
                redis_connect_func=self._on_connect,
            )
            self._register()
        self._is_registered = True
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"xccl-redis-{rank}", daemon=True
        )
        self._heartbeat.start()

    def _alive_key(self, rank: str) -> str:
        return f"{self._ns}:alive:{_q(rank)}"

    def _queue_key(self, receiver: str, sender: str, tag: str) -> str:
        return f"{self._ns}:q:{_q(receiver)}:{_q(sender)}:{_q(tag)}"

    def _register(self) -> None:
        """Claim our alive-key; a dead predecessor's key is waited out (it stops renewing)."""
        ttl_ms = int(self._config.liveness_ttl_s * 1000)
        deadline = time.monotonic() + 1.5 * self._config.liveness_ttl_s
        backoff = Backoff(min_s=0.01, max_s=0.1)
        while not self._client.set(self._alive_key(self.rank), self._instance, nx=True, px=ttl_ms):
            if not backoff.sleep(deadline):
                raise RankInUse(
                    f"rank {self.rank!r} of group {self.group!r} is held by a live "
                    "endpoint (its heartbeat keeps renewing)"
                )

    def _on_connect(self, connection: redis.connection.AbstractConnection) -> None:
        """Each new connection: redis-py's handshake, then our alive-key again if the server
        no longer has it (a restarted Redis starts empty; see the module docstring)."""
        connection.on_connect()  # type: ignore[no-untyped-call]  # redis-py is untyped here
        if not self._is_registered or self._stop.is_set():
            return
        ttl_ms = int(self._config.liveness_ttl_s * 1000)
        connection.send_command(  # type: ignore[no-untyped-call]
            "SET", self._alive_key(self.rank), self._instance, "NX", "PX", ttl_ms)
        if connection.read_response() is not None:  # it was gone: the server lost its state
            self._seen_alive.clear()
            logger.warning("xccl %s: redis lost this endpoint's registration (restarted?); "
                           "registered again", self.rank)

    def _beat(self) -> None:
        ttl_ms = int(self._config.liveness_ttl_s * 1000)
        renew = self._client.register_script(_RENEW_IF_OURS)
        while not self._stop.wait(self._config.liveness_ttl_s / 3):
            try:
                if not renew(keys=[self._alive_key(self.rank)], args=[self._instance, ttl_ms]):
                    # We stalled past the TTL and a new endpoint took the rank: it wins.
                    logger.error("xccl %s: rank taken over by another endpoint", self.rank)
                    return
            except redis.exceptions.RedisError as exc:
                logger.warning("xccl %s heartbeat failed: %s", self.rank, exc)

    def is_alive(self, peer: str) -> bool:
        with _redis_errors("liveness check"):
            alive = bool(self._client.exists(self._alive_key(peer)))
        if alive:
            self._seen_alive.add(peer)
        return alive

    # --- send ----------------------------------------------------------------------------------

    def _send_by(self, peer: str, tag: str, tensors: list[torch.Tensor], deadline: float) -> None:
        with self._closing_guard():
            self._send(peer, tag, tensors, deadline)

    def _recv_by(self, peer: str, tag: str, deadline: float) -> list[torch.Tensor]:
        with self._closing_guard():
            return self._recv(peer, tag, deadline)

    @contextlib.contextmanager
    def _closing_guard(self) -> Iterator[None]:
        # close() from another thread disconnects the sockets under a blocked call, and
        # redis-py then fails in assorted ways (even ValueError): all of them mean "closed".
        try:
            yield
        except Exception as exc:
            if self.is_closed and not isinstance(exc, TransportClosed):
                raise TransportClosed(f"endpoint {self.rank!r} closed during the call") from exc
            raise

    def _send(self, peer: str, tag: str, tensors: list[torch.Tensor], deadline: float) -> None:
        self.check_open()
        metas, num_bytes = layout_of(tensors)
        if len(tensors) == 1 and tensors[0].device.type == "cpu":
            payload = as_bytes(tensors[0])  # one tensor at offset 0: its own bytes, no copy
        else:
            payload = torch.empty(num_bytes, dtype=torch.uint8)
            write_payload(payload, metas, tensors)
        data = payload.numpy().data
        checksum = payload_checksum(data) if self._config.checksum else None
        chunk = self._config.chunk_num_bytes
        location = ""
        if num_bytes > self._config.inline_max_bytes:
            location = f"{self._ns}:d:{_q(self.rank)}:{self._instance}:{next(self._seq)}"
        header = FrameHeader(
            self.rank,
            tag,
            metas,
            num_bytes,
            location=location,
            chunk_num_bytes=chunk if location else 0,
            checksum=checksum,
            is_inline=not location,
        )
        element = encode_header(header) + (bytes(data) if header.is_inline else b"")
        queue = self._queue_key(peer, self.rank, tag)
        chunk_keys = [f"{location}:{i}" for i in range(-(-num_bytes // chunk))] if location else []
        with _redis_errors("send"):
            pipe = self._client.pipeline(transaction=False)
            pipe.exists(self._alive_key(peer))
            for i, key in enumerate(chunk_keys):
                pipe.set(key, data[i * chunk : (i + 1) * chunk], px=self._ttl_ms)
            pipe.rpush(queue, element)
            pipe.pexpire(queue, self._ttl_ms)
            is_alive = bool(pipe.execute()[0])
            if is_alive:
                self._seen_alive.add(peer)
                return
            self._await_receiver(peer, queue, element, chunk_keys, deadline)

    def _await_receiver(
        self, peer: str, queue: str, element: bytes, chunk_keys: list[str], deadline: float
    ) -> None:
        """The message is queued but the peer is not alive: wait for it or take it back."""
        backoff = Backoff(min_s=0.005, max_s=self._config.poll_interval_s)
        if peer not in self._seen_alive:
            while backoff.sleep(deadline):
                self.check_open()
                if self.is_alive(peer):
                    return
        # Taking the message back failed when the peer consumed it meanwhile: then it got it.
        if self._client.lrem(queue, 1, element) == 0:  # type: ignore[arg-type]  # bytes ok
            return
        if chunk_keys:
            self._client.delete(*chunk_keys)
        if peer in self._seen_alive:
            raise PeerGone(peer, "its heartbeat expired or it closed")
        raise XcclTimeout(f"peer {peer!r} did not open its endpoint within the timeout")

    # --- receive -------------------------------------------------------------------------------

    def _recv(self, peer: str, tag: str, deadline: float) -> list[torch.Tensor]:
        queue = self._queue_key(self.rank, peer, tag)
        while True:
            self.check_open()
            remaining_s = deadline - time.monotonic()
            with _redis_errors("recv"):
                if remaining_s <= 0:
                    element = self._client.lpop(queue)
                    if element is None:
                        raise XcclTimeout(f"no message {tag!r} from {peer!r} within the timeout")
                    return self._open(_as_bytes(element))
                block_s = max(_MIN_BLOCK_S, min(remaining_s, self._config.poll_interval_s))
                popped = self._client.blpop([queue], timeout=block_s)
                if popped is not None:
                    self._seen_alive.add(peer)
                    return self._open(_as_bytes(popped[1]))
                if not self.is_alive(peer) and peer in self._seen_alive:
                    element = self._client.lpop(queue)  # it may have sent just before vanishing
                    if element is not None:
                        return self._open(_as_bytes(element))
                    raise PeerGone(peer, f"its heartbeat expired before it sent {tag!r}")

    def _open(self, element: bytes) -> list[torch.Tensor]:
        header, header_bytes = decode_header(element)
        num_bytes = header.payload_num_bytes
        payload = torch.empty(num_bytes, dtype=torch.uint8)
        dst = payload.numpy()
        if header.is_inline:
            dst[:] = np.frombuffer(element, np.uint8, num_bytes, header_bytes)
        else:
            self._fetch_chunks(header, dst)
        verify_checksum(header, dst.data)
        return views_of_payload(payload, header.tensors)

    def _fetch_chunks(self, header: FrameHeader, dst: npt.NDArray[np.uint8]) -> None:
        """GETDEL every chunk of a message into `dst` (the bulk connection when possible)."""
        chunk, num_bytes = header.chunk_num_bytes, header.payload_num_bytes
        if not header.location.startswith(f"{self._ns}:d:") or chunk <= 0:
            raise FrameError(f"bad payload location {header.location!r} or chunk size")
        keys = [f"{header.location}:{i}" for i in range(-(-num_bytes // chunk))]
        slots = [dst.data[i * chunk : (i + 1) * chunk] for i in range(len(keys))]
        if BulkConnection.supports(self._config.url):
            with self._bulk_lock:
                lengths = self._bulk_getdel(keys, slots)
        else:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.getdel(key)
            lengths = []
            for slot, value in zip(slots, pipe.execute(), strict=True):
                lengths.append(-1 if value is None else len(value))
                if value is not None and len(value) <= len(slot):
                    slot[: len(value)] = value
        for i, (slot, length) in enumerate(zip(slots, lengths, strict=True)):
            if length != len(slot):
                raise MessageLost(
                    f"chunk {i} of {header.tag!r} from {header.sender!r} expired or was altered"
                )

    def _bulk_getdel(self, keys: list[str], slots: list[memoryview]) -> list[int]:
        """GETDEL into ``slots`` on the bulk connection (hold ``_bulk_lock``). A connection kept
        from before that fails is replaced once: Redis may have restarted since it was opened.
        Asking again is safe: the new server never saw the first try, and had the old one died
        mid-reply its keys died with it (the retry then finds them missing: MessageLost)."""
        for attempt in range(2):
            is_reused = self._bulk is not None
            try:
                self._bulk = self._bulk or BulkConnection.open(
                    self._config.url, self._config.socket_timeout_s,
                    password=self._config.password,
                )
                return self._bulk.getdel_into(keys, slots)
            except (OSError, BackendUnavailable) as exc:
                if self._bulk is not None:
                    self._bulk.close()  # mid-reply: the stream cannot be trusted any more
                self._bulk = None
                if attempt or not is_reused:
                    raise BackendUnavailable(f"redis bulk read failed: {exc}") from exc
        raise AssertionError("unreachable")

    # --- close ---------------------------------------------------------------------------------

    def _close(self) -> None:
        self._stop.set()
        self._heartbeat.join(timeout=5.0)
        try:
            self._drop_inbox()
            self._client.delete(self._alive_key(self.rank))
        except redis.exceptions.RedisError as exc:
            logger.warning(
                "xccl %s: cleanup on close failed (keys expire anyway): %s", self.rank, exc
            )
        finally:
            with self._bulk_lock:
                if self._bulk is not None:
                    self._bulk.close()
            self._client.close()

    def _drop_inbox(self) -> None:
        """Delete unconsumed messages addressed to us, chunks included."""
        pattern = f"{self._ns}:q:{_q(self.rank)}:*"
        for queue in self._client.scan_iter(match=pattern, count=1000):
            keys = [queue]
            for element in self._client.lrange(queue, 0, -1):
                try:
                    header, _ = decode_header(_as_bytes(element))
                except FrameError:
                    continue
                if header.location.startswith(f"{self._ns}:d:"):
                    num_chunks = -(-header.payload_num_bytes // header.chunk_num_bytes)
                    keys += [f"{header.location}:{i}" for i in range(num_chunks)]
            self._client.delete(*keys)
