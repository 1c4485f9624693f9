"""Same-host XCCL backend: one copy per message through shared memory, a socket as doorbell.

The stand-in for CloudMatrix global memory. `send` copies the tensors once into a segment of the
sender's pool (shm_segments.py) and announces it with one datagram on the receiver's Unix socket
(`send` never waits for the receiver to consume). Small payloads (`ShmConfig.inline_max_bytes`)
ride inside the datagram instead. A progress thread per endpoint drains its socket into per
(peer, tag) FIFO queues, so a slow consumer never blocks senders in the kernel queue (10
datagrams by default), and it maps announced segments right away, so a sender that closes just
after sending loses nothing. `recv` hands out tensors that *view* the sender's segment: no copy
on the receive side; the segment returns to the sender when the last view is collected.

A waiting call probes its peer's socket every `liveness_interval_s`, so a peer killed mid-wait
surfaces as `PeerGone` within that interval (after a fence that drains datagrams it sent first).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from moeflow.xccl.base import Backoff, EndpointBase, TensorSpec
from moeflow.xccl.config import ShmConfig
from moeflow.xccl.errors import (
    BackendUnavailable,
    FrameError,
    PeerGone,
    RankInUse,
    XcclError,
    XcclTimeout,
)
from moeflow.xccl.messages import (
    FrameHeader,
    TensorMeta,
    decode_header,
    encode_header,
    payload_checksum,
    verify_checksum,
)
from moeflow.xccl.shm_names import PeerState, parse_name, probe, socket_path
from moeflow.xccl.shm_segments import SEGMENT_HEADER_BYTES, MappingCache, SegmentPool
from moeflow.xccl.tensors import (
    layout_of,
    layout_of_specs,
    payload_from_numpy,
    views_of_payload,
    write_payload,
)

logger = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 256 << 10
_RECV_BUFFER_BYTES = 512 << 10  # >= header cap + inline cap, so no datagram is ever truncated
_SEND_BUFFER_BYTES = 4 << 20


@dataclass(slots=True)
class _Arrival:
    """One received message waiting in the inbox, or the reason it cannot be delivered."""

    header: FrameHeader
    payload: torch.Tensor | npt.NDArray[np.uint8] | None
    error: XcclError | None = None

    def tensors(self) -> list[torch.Tensor]:
        if self.error is not None:
            raise self.error
        payload = self.payload
        self.payload = None  # the caller's views become the only owners of the segment
        if isinstance(payload, np.ndarray):
            payload = payload_from_numpy(payload)
        assert payload is not None
        return views_of_payload(payload, self.header.tensors)


class ShmTransport(EndpointBase):
    """Endpoint of the shared-memory backend. See the module docstring."""

    def __init__(self, group: str, rank: str, config: ShmConfig | None = None) -> None:
        super().__init__(group, rank)
        self._config = config or ShmConfig()
        self._dir = self._config.shm_dir
        if not self._dir.is_dir():
            raise BackendUnavailable(f"shm_dir {self._dir} does not exist")
        self._path = socket_path(self._dir, group, rank)
        self._sock = self._bind()
        self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER_BYTES)
        self._pool = SegmentPool(self._dir, group, rank, self._config)
        self._mappings = MappingCache(self._dir, self._config.max_cached_mappings)
        self._inbox: dict[tuple[str, str], deque[_Arrival]] = {}
        self._cond = threading.Condition()
        self._seen_alive: set[str] = set()
        self._peer_paths: dict[str, str] = {}
        self._fences_sent = self._fences_seen = 0
        self._thread = threading.Thread(target=self._progress, name=f"xccl-shm-{rank}", daemon=True)
        self._thread.start()

    def _bind(self) -> socket.socket:
        """Bind our socket, taking over a dead predecessor's name and removing its leftovers."""
        state = probe(self._path)
        if state is PeerState.ALIVE:
            raise RankInUse(
                f"rank {self.rank!r} of group {self.group!r} is held by a live "
                f"endpoint at {self._path}"
            )
        if state is PeerState.GONE:
            self._path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(os.fspath(self._path))
        except OSError as exc:  # lost a race for the same rank, or the directory is unusable
            sock.close()
            raise RankInUse(f"cannot bind {self._path}: {exc}") from exc
        # The name is ours now: segments under it belong to a dead predecessor.
        for path in self._dir.glob(f"{self._path.name.removesuffix('.sock')}@*.seg"):
            if parse_name(path.name) == (self.group, self.rank, "seg"):
                path.unlink(missing_ok=True)
        return sock

    def peer_state(self, peer: str) -> PeerState:
        """ALIVE, ABSENT (closed or never opened) or GONE (died without cleaning up)."""
        return probe(self._peer_path(peer))

    def _peer_path(self, peer: str) -> Path:
        return socket_path(self._dir, self.group, peer)

    # --- send ----------------------------------------------------------------------------------

    def _send_by(self, peer: str, tag: str, tensors: list[torch.Tensor], deadline: float) -> None:
        self.check_open()
        metas, num_bytes = layout_of(tensors)

        def write(payload: torch.Tensor) -> None:
            write_payload(payload, metas, tensors)

        self._send_payload(peer, tag, metas, num_bytes, write, deadline)

    def _send_into_by(
        self,
        peer: str,
        tag: str,
        specs: list[TensorSpec],
        fill: Callable[[list[torch.Tensor]], None],
        deadline: float,
    ) -> None:
        # The caller writes straight into the segment: no staging tensor, one copy in all.
        self.check_open()
        metas, num_bytes = layout_of_specs(specs)

        def write(payload: torch.Tensor) -> None:
            fill(views_of_payload(payload, metas))

        self._send_payload(peer, tag, metas, num_bytes, write, deadline)

    def _send_payload(
        self,
        peer: str,
        tag: str,
        metas: tuple[TensorMeta, ...],
        num_bytes: int,
        write: Callable[[torch.Tensor], None],
        deadline: float,
    ) -> None:
        """`write` the payload into the datagram (small) or a pooled segment, then announce it."""
        if num_bytes <= self._config.inline_max_bytes:
            payload = torch.empty(num_bytes, dtype=torch.uint8)
            write(payload)
            data = payload.numpy().tobytes()
            checksum = payload_checksum(data) if self._config.checksum else None
            header = FrameHeader(
                self.rank, tag, metas, num_bytes, checksum=checksum, is_inline=True
            )
            self._deliver(peer, self._frame(header) + data, deadline)
            return
        segment = self._pool.acquire(num_bytes, peer, deadline, self.peer_state)
        try:
            write(segment.payload)
            checksum = None
            if self._config.checksum:
                checksum = payload_checksum(segment.payload.numpy()[:num_bytes].data)
            header = FrameHeader(
                self.rank,
                tag,
                metas,
                num_bytes,
                location=segment.path.name,
                payload_offset=SEGMENT_HEADER_BYTES,
                checksum=checksum,
            )
            self._deliver(peer, self._frame(header), deadline)
        except BaseException:
            self._pool.abandon(segment)
            raise

    @staticmethod
    def _frame(header: FrameHeader) -> bytes:
        frame = encode_header(header)
        if len(frame) > _MAX_HEADER_BYTES:
            raise ValueError(
                f"message header of {len(frame)} bytes is over {_MAX_HEADER_BYTES}:"
                " send fewer tensors per message"
            )
        return frame

    def _deliver(self, peer: str, frame: bytes, deadline: float) -> None:
        """Put one datagram on the peer's socket; waits for a peer that is not there yet."""
        path = self._peer_paths.get(peer)
        if path is None:
            path = self._peer_paths.setdefault(peer, os.fspath(self._peer_path(peer)))
        # Short steps: a full queue drains within microseconds once the receiver runs.
        backoff = Backoff(max_s=1e-3)
        while True:
            self.check_open()
            try:
                # Non-blocking, so concurrent senders need no lock and the deadline stays ours.
                self._out.sendto(frame, socket.MSG_DONTWAIT, path)
                self._seen_alive.add(peer)
                return
            except FileNotFoundError:
                if peer in self._seen_alive:
                    raise PeerGone(peer, "its endpoint closed") from None
                reason = f"peer {peer!r} did not open its endpoint"
            except ConnectionRefusedError:
                raise PeerGone(peer, "its process died without closing") from None
            except BrokenPipeError:
                raise PeerGone(peer, "its endpoint is closing") from None
            except BlockingIOError:
                reason = f"peer {peer!r} is not draining its socket"
            except OSError as exc:
                raise BackendUnavailable(f"sending to {path}: {exc}") from exc
            if not backoff.sleep(deadline):
                raise XcclTimeout(reason)

    # --- receive -------------------------------------------------------------------------------

    def _progress(self) -> None:
        """Drain the socket until close: frames go to the inbox, empty datagrams are fences."""
        buffer = bytearray(_RECV_BUFFER_BYTES)
        view = memoryview(buffer)
        while True:
            try:
                num_bytes = self._sock.recv_into(buffer)
            except OSError:
                num_bytes = 0
            if self.is_closed:
                return
            if num_bytes == 0:
                with self._cond:
                    self._fences_seen += 1
                    self._cond.notify_all()
                continue
            try:
                arrival = self._accept(view[:num_bytes])
            except FrameError as exc:
                logger.warning("xccl %s dropped a malformed frame: %s", self.rank, exc)
                continue
            except Exception:
                logger.exception("xccl %s failed to accept a frame", self.rank)
                continue
            self._seen_alive.add(arrival.header.sender)
            with self._cond:
                key = (arrival.header.sender, arrival.header.tag)
                self._inbox.setdefault(key, deque()).append(arrival)
                self._cond.notify_all()

    def _accept(self, frame: memoryview) -> _Arrival:
        header, header_bytes = decode_header(frame)
        num_bytes = header.payload_num_bytes
        if header.is_inline:
            payload = torch.empty(num_bytes, dtype=torch.uint8)
            payload.numpy()[:] = np.frombuffer(frame, np.uint8, num_bytes, header_bytes)
            verify_checksum(header, frame[header_bytes : header_bytes + num_bytes])
            return _Arrival(header, payload)
        try:
            array = self._mappings.view(header.location, header.payload_offset, num_bytes)
            if header.checksum is not None:
                verify_checksum(header, array.data)
        except XcclError as exc:
            return _Arrival(header, None, exc)
        return _Arrival(header, array)

    def _recv_by(self, peer: str, tag: str, deadline: float) -> list[torch.Tensor]:
        key = (peer, tag)
        interval_s = self._config.liveness_interval_s
        while True:
            wait_until = min(deadline, time.monotonic() + interval_s)
            with self._cond:
                while not (arrival := self._pop(key)) and time.monotonic() < wait_until:
                    self._cond.wait(wait_until - time.monotonic())
            if arrival:
                return arrival.tensors()
            if time.monotonic() >= deadline:
                raise XcclTimeout(f"no message {tag!r} from {peer!r} within the timeout")
            state = self.peer_state(peer)
            if state is PeerState.ALIVE:
                self._seen_alive.add(peer)
            elif state is PeerState.GONE or peer in self._seen_alive:
                # Datagrams it sent before vanishing may still sit in our socket: drain them.
                self._fence(deadline)
                with self._cond:
                    arrival = self._pop(key)
                if arrival:
                    return arrival.tensors()
                raise PeerGone(peer, f"its endpoint is {state.value} and sent no {tag!r}")

    def _pop(self, key: tuple[str, str]) -> _Arrival | None:
        """Oldest arrival for key; caller holds the condition. Raises once the endpoint closed."""
        self.check_open()
        queue = self._inbox.get(key)
        if not queue:
            return None
        arrival = queue.popleft()
        if not queue:
            del self._inbox[key]
        return arrival

    def _fence(self, deadline: float) -> None:
        """Wait until the progress thread handled every datagram that arrived before now."""
        with self._cond:
            self._fences_sent += 1
            target = self._fences_sent
        try:
            self._out.sendto(b"", os.fspath(self._path))
        except OSError as exc:  # closed under us, most likely
            self.check_open()
            raise BackendUnavailable(f"fence on {self._path}: {exc}") from exc
        with self._cond:
            while self._fences_seen < target and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())

    # --- close ---------------------------------------------------------------------------------

    def _close(self) -> None:
        with self._cond:
            self._cond.notify_all()  # waiters see is_closed and raise TransportClosed
        self._sock.shutdown(socket.SHUT_RDWR)  # wakes the progress thread
        self._thread.join(timeout=5.0)
        with self._cond:
            self._inbox.clear()  # dropping the arrivals' views hands their segments back
        self._pool.close(self._config.close_linger_s, self._holder_state)
        self._mappings.clear()
        self._path.unlink(missing_ok=True)  # after the segments: see shm_segments.py
        self._sock.close()
        self._out.close()

    def _holder_state(self, peer: str) -> PeerState:
        # Our own progress thread has stopped: never linger for messages to ourselves.
        return PeerState.ABSENT if peer == self.rank else self.peer_state(peer)
