"""Spin-then-block shared-memory rings: point-to-point messages that wake nobody while the
receiver is polling (the attention/expert exchange's fast path on one host).

Why: on the shm transport every message is a datagram that wakes the receiver's progress
thread, which wakes the consumer thread; on a small box each wake can cost the sender its core.
Here a sender copies the message into the receiver's ring (one file in `shm_dir` per
(sender, receiver), created by the receiver) and publishes it by advancing a counter. A
receiver polls its ring for `spin_s` after each message (yielding the core between polls), then
marks itself waiting and blocks on the wrapped `Transport` for a doorbell, which a sender sends
only when it finds that mark. Busy exchanges thus run without wakes; idle ones cost nothing.

Semantics follow the `Transport` contract for what the AE exchange uses (`send`, `recv`;
one tag per direction): per (sender, receiver) messages arrive in send order; received tensors
are copies (the ring slot is reused at once); `recv` raises `XcclTimeout` at its deadline and
`PeerGone` when the wrapped transport reports the peer gone while blocked (after draining what
the peer had already written). Messages over a quarter of the ring travel on the transport
instead, behind a marker record that keeps their place in the order.

Layout: a 4 KiB header of int64 counters (bytes written, bytes read, receiver-waiting flag),
then `capacity` bytes of 8-byte aligned records: int64 length (-1: skip to the end of the ring;
-2: the message follows on the transport) and the encoded tensors. One writer thread and one
reader thread per ring (SPSC). A restarted receiver re-creates its rings; senders notice by the
file's inode and map the new one.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from moeflow.xccl.base import Transport
from moeflow.xccl.errors import PeerGone, TransportClosed, XcclTimeout
from moeflow.xccl.shm_names import quote_name

_HEADER = 4096
_WRITTEN, _READ, _WAITING = 0, 8, 16  # int64 slots of the header (one cache line apart)
_SKIP, _ON_TRANSPORT = -1, -2
_BELL = "ring-bell"
_BELL_BODY = torch.zeros(1, dtype=torch.uint8)
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
           torch.bool, torch.float64, torch.int8, torch.int16]
_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}
_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier (an uncontended lock is an atomic read-modify-write): orders the
    waiting flag against the written counter on both sides, so no doorbell is lost."""
    with _fence_lock:
        pass


def ring_path(shm_dir: Path, group: str, sender: str, receiver: str) -> Path:
    return shm_dir / f"xring@{quote_name(group)}@{quote_name(sender)}@{quote_name(receiver)}"


def encode(tensors: Sequence[torch.Tensor]) -> tuple[np.ndarray, list[torch.Tensor]]:
    """The int64 header (count, then per tensor: dtype code, ndim, shape, bytes) and the
    contiguous tensors whose bytes follow it, each padded to 8 bytes."""
    head: list[int] = [len(tensors)]
    flat: list[torch.Tensor] = []
    for t in tensors:
        if t.dtype not in _CODE:
            raise ValueError(f"ring messages cannot carry {t.dtype}")
        t = t.detach().contiguous().cpu()
        head += [_CODE[t.dtype], t.dim(), *t.shape, t.numel() * t.element_size()]
        flat.append(t)
    return np.array(head, dtype=np.int64), flat


def _pad(n: int) -> int:
    return (n + 7) & ~7


class _Ring:
    """One mapped ring file: the counters, the data area, and the inode it was opened at."""

    def __init__(self, path: Path, capacity: int | None) -> None:
        if capacity is not None:  # the receiver creates it (replacing a dead predecessor's)
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, _HEADER + capacity)
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            st = os.fstat(fd)
            self.inode = st.st_ino
            self.map = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        self.ctl = np.frombuffer(self.map, dtype=np.int64, count=_HEADER // 8)
        self.data = np.frombuffer(self.map, dtype=np.uint8, offset=_HEADER)
        self.capacity = st.st_size - _HEADER
        self.path = path

    def close(self) -> None:
        del self.ctl, self.data
        # a thread still holding a view keeps the mapping alive until it lets go
        with contextlib.suppress(BufferError):
            self.map.close()


class RingEndpoint:
    """The rings of one endpoint: inbound from each of `peers` (created here), outbound to
    each peer (mapped on first send). `transport` is this endpoint's XCCL transport: it carries
    doorbells, oversized messages, and the liveness of peers."""

    def __init__(self, transport: Transport, shm_dir: Path, peers: Sequence[str], *,
                 spin_s: float, capacity: int = 8 << 20) -> None:
        if spin_s < 0 or capacity < 4096 or capacity % 8:
            raise ValueError("need spin_s >= 0 and a capacity of >= 4096 bytes, a multiple of 8")
        self.transport = transport
        self.spin_s = spin_s
        self._dir = shm_dir
        self._inbound = {p: _Ring(ring_path(shm_dir, transport.group, p, transport.rank),
                                  capacity) for p in peers}
        self._outbound: dict[str, _Ring] = {}
        self._closed = False

    # -- send ----------------------------------------------------------------------------
    def send(self, peer: str, tag: str, tensors: Sequence[torch.Tensor], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        ring = self._outbound_ring(peer, deadline)
        head, flat = encode(tensors)
        size = 8 + head.nbytes + sum(_pad(t.numel() * t.element_size()) for t in flat)
        if size > ring.capacity // 4:
            self._put(ring, peer, 8, deadline, None, _ON_TRANSPORT)
            self.transport.send(peer, tag, flat, max(0.0, deadline - time.monotonic()))
            return

        def write(pos: int) -> None:
            data = ring.data
            end = pos + 8 + head.nbytes
            data[pos + 8 : end] = head.view(np.uint8)
            for t in flat:
                n = t.numel() * t.element_size()
                if n:
                    data[end : end + n] = t.view(-1).view(torch.uint8).numpy()
                end += _pad(n)

        self._put(ring, peer, size, deadline, write, size - 8)

    def _put(self, ring: _Ring, peer: str, size: int, deadline: float,
             write: Callable[[int], None] | None, length: int) -> None:
        ctl, cap = ring.ctl, ring.capacity
        written = int(ctl[_WRITTEN])
        pos = written % cap
        if pos + size > cap:  # no room before the end: a skip record, then from the start
            self._wait_space(ring, peer, written + (cap - pos), deadline)
            ring.data[pos : pos + 8].view(np.int64)[0] = _SKIP
            written += cap - pos
            pos = 0
        self._wait_space(ring, peer, written + size, deadline)
        if write is not None:
            write(pos)
        ring.data[pos : pos + 8].view(np.int64)[0] = length
        ctl[_WRITTEN] = written + size
        _fence()
        if ctl[_WAITING]:  # the receiver went to sleep: ring its doorbell
            ctl[_WAITING] = 0
            self.transport.send(peer, _BELL, [_BELL_BODY], max(0.0, deadline - time.monotonic()))

    def _wait_space(self, ring: _Ring, peer: str, upto: int, deadline: float) -> None:
        sleep_s = 20e-6
        while upto - int(ring.ctl[_READ]) > ring.capacity:
            if time.monotonic() >= deadline:
                raise XcclTimeout(f"{peer!r} is not draining its ring")
            time.sleep(sleep_s)
            sleep_s = min(sleep_s * 2, 2e-3)

    def _outbound_ring(self, peer: str, deadline: float) -> _Ring:
        if self._closed:
            raise TransportClosed(f"ring endpoint {self.transport.rank!r} is closed")
        path = ring_path(self._dir, self.transport.group, self.transport.rank, peer)
        ring = self._outbound.get(peer)
        sleep_s = 1e-3
        while True:
            try:
                inode = os.stat(path).st_ino
            except FileNotFoundError:
                inode = None
            if ring is not None and inode == ring.inode:
                return ring
            if ring is not None:  # the receiver restarted (new ring) or closed (none)
                ring.close()
                del self._outbound[peer]
                ring = None
                if inode is None:
                    raise PeerGone(peer, "its ring is gone")
            if inode is not None:
                try:
                    ring = self._outbound[peer] = _Ring(path, None)
                    return ring
                except FileNotFoundError:
                    pass
            if time.monotonic() >= deadline:
                raise XcclTimeout(f"peer {peer!r} has not opened its ring")
            time.sleep(sleep_s)

    # -- receive -------------------------------------------------------------------------
    def recv(self, peer: str, tag: str, timeout_s: float) -> list[torch.Tensor]:
        """The oldest message from `peer`: poll for spin_s, then block for a doorbell."""
        if self._closed:
            raise TransportClosed(f"ring endpoint {self.transport.rank!r} is closed")
        ring = self._inbound[peer]
        deadline = time.monotonic() + timeout_s
        spin_until = time.monotonic() + self.spin_s
        while True:
            message = self._take(ring, peer, tag, deadline)
            if message is not None:
                return message
            now = time.monotonic()
            if now < spin_until:
                os.sched_yield()  # let a process that has work run on this core
                continue
            if now >= deadline:
                raise XcclTimeout(f"no message {tag!r} from {peer!r} within the timeout")
            ring.ctl[_WAITING] = 1
            _fence()
            message = self._take(ring, peer, tag, deadline)
            if message is not None:
                ring.ctl[_WAITING] = 0
                return message
            try:
                self.transport.recv(peer, _BELL, deadline - now)
            except XcclTimeout:
                pass
            except PeerGone:
                message = self._take(ring, peer, tag, deadline)
                if message is None:
                    raise
                return message
            ring.ctl[_WAITING] = 0
            spin_until = time.monotonic() + self.spin_s

    def _take(self, ring: _Ring, peer: str, tag: str, deadline: float
              ) -> list[torch.Tensor] | None:
        ctl, cap, data = ring.ctl, ring.capacity, ring.data
        while True:
            read = int(ctl[_READ])
            if int(ctl[_WRITTEN]) == read:
                return None
            pos = read % cap
            length = int(data[pos : pos + 8].view(np.int64)[0])
            if length == _SKIP:
                ctl[_READ] = read + cap - pos
                continue
            if length == _ON_TRANSPORT:
                ctl[_READ] = read + 8
                return self.transport.recv(peer, tag, max(0.0, deadline - time.monotonic()))
            out = _decode(data, pos + 8)
            ctl[_READ] = read + 8 + length
            return out

    def close(self) -> None:
        """Unmap every ring and remove the inbound ones (senders see them gone). Idempotent;
        the wrapped transport is the caller's to close."""
        if self._closed:
            return
        self._closed = True
        for ring in self._inbound.values():
            ring.path.unlink(missing_ok=True)
            ring.close()
        for ring in self._outbound.values():
            ring.close()
        self._inbound.clear()
        self._outbound.clear()


def _decode(data: np.ndarray, pos: int) -> list[torch.Tensor]:
    count = int(data[pos : pos + 8].view(np.int64)[0])
    cursor = pos + 8
    metas: list[tuple[torch.dtype, list[int], int]] = []
    for _ in range(count):
        code, ndim = (int(v) for v in data[cursor : cursor + 16].view(np.int64))
        rest = data[cursor + 16 : cursor + 16 + 8 * (ndim + 1)].view(np.int64).tolist()
        metas.append((_DTYPES[code], rest[:ndim], rest[ndim]))
        cursor += 16 + 8 * (ndim + 1)
    out: list[torch.Tensor] = []
    for dtype, shape, n in metas:
        t = torch.empty(shape, dtype=dtype)
        if n:
            t.view(-1).view(torch.uint8).numpy()[:] = data[cursor : cursor + n]
        out.append(t)
        cursor += _pad(n)
    return out
