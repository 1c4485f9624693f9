"""Shared-memory segments of the shm backend: the sender's pool and the receiver's mappings.

A segment (a file in `ShmConfig.shm_dir`, named as shm_names.py says) is a 64-byte state header
followed by payload bytes. It belongs to the
endpoint that created it (the *sender*), which reuses it for many messages: pages stay faulted in
on both sides, which is what makes one copy per message reach memcpy speed. Ownership of a
segment passes through its state word (word 0 of the header, 8-byte aligned, so plain stores are
atomic), and every transition has exactly one writer:

    FREE   -> SENT    sender, when it picks the segment for a message
    SENT   -> MAPPED  receiver's progress thread, when it has mapped the announced segment
    MAPPED -> FREE    receiver, when the last tensor viewing the message is garbage-collected

A sender reclaims segments from holders that died (shm_names.probe says GONE).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from moeflow.xccl.base import Backoff
from moeflow.xccl.config import ShmConfig
from moeflow.xccl.errors import (
    BackendUnavailable,
    FrameError,
    MessageLost,
    PayloadTooLarge,
    XcclTimeout,
)
from moeflow.xccl.shm_names import PREFIX, PeerState, parse_name, quote_name

SEGMENT_HEADER_BYTES = 64
FREE, SENT, MAPPED = 0, 1, 2


def _state_words(mm: mmap.mmap) -> memoryview:
    # A memoryview of int64 words: 8-byte aligned stores are single instructions (atomic on
    # x86-64 and arm64), and item access is ~10x cheaper than numpy scalar indexing.
    return memoryview(mm)[:SEGMENT_HEADER_BYTES].cast("q")


def _map(path: Path, create_bytes: int = 0) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create_bytes else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create_bytes:
            # Reserve the pages now: writing through a mapping into a full tmpfs (Docker's
            # default /dev/shm is 64 MiB) kills the process with SIGBUS; this fails with ENOSPC.
            try:
                os.posix_fallocate(fd, 0, create_bytes)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    path.unlink(missing_ok=True)
                    raise
                os.ftruncate(fd, create_bytes)
        return mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
    finally:
        os.close(fd)


def capacity_for(num_bytes: int, min_bytes: int) -> int:
    """Size class of a payload: within 1/8 above it (classes make segments reusable)."""
    if num_bytes <= min_bytes:
        return min_bytes
    step = (1 << (num_bytes - 1).bit_length()) // 8
    return -(-num_bytes // step) * step


class Segment:
    """One sender-owned segment: state header plus a writable payload view."""

    def __init__(self, path: Path, capacity_bytes: int, seq: int) -> None:
        self.path = path
        self.seq = seq
        self.capacity_bytes = capacity_bytes
        self.mm = _map(path, SEGMENT_HEADER_BYTES + capacity_bytes)
        self.state = _state_words(self.mm)
        self.payload = torch.frombuffer(
            self.mm, dtype=torch.uint8, count=capacity_bytes, offset=SEGMENT_HEADER_BYTES
        )
        self.holder = ""
        self.last_used_s = 0.0

    def destroy(self) -> None:
        self.path.unlink(missing_ok=True)
        del self.state, self.payload
        # BufferError: a view is still alive somewhere, and the mapping goes away with it.
        with contextlib.suppress(BufferError):
            self.mm.close()


class SegmentPool:
    """The segments one sender owns, reused across messages. Thread-safe.

    Segments of one capacity class sit in acquisition order. Receivers release roughly in
    that order, so `acquire` tries the last segment used (cache-warm) and then the oldest
    one, and creates a new segment otherwise: O(1) per message however many are in flight.
    Only when the pool is full does it scan everything (and reclaim from dead holders).
    """

    def __init__(self, shm_dir: Path, group: str, rank: str, config: ShmConfig) -> None:
        self._config = config
        self._prefix = f"{PREFIX}{quote_name(group)}@{quote_name(rank)}@{os.urandom(4).hex()}"
        self._shm_dir = shm_dir
        self._classes: dict[int, OrderedDict[int, Segment]] = {}
        self._hot: dict[int, Segment] = {}
        self._seq = self._num_acquires = self.num_bytes = 0
        self._lock = threading.Lock()

    def segments(self) -> list[Segment]:
        return [seg for cls in self._classes.values() for seg in cls.values()]

    def acquire(
        self, num_bytes: int, peer: str, deadline: float, state_of: Callable[[str], PeerState]
    ) -> Segment:
        """A segment with room for `num_bytes`, marked SENT to `peer`; waits for releases."""
        capacity = capacity_for(num_bytes, self._config.min_segment_bytes)
        if capacity > self._config.max_pool_bytes:
            raise PayloadTooLarge(
                f"a message of {num_bytes} bytes (segment class {capacity}) cannot fit in this "
                f"sender's segment pool of max_pool_bytes={self._config.max_pool_bytes}: send it "
                "in smaller messages or raise ShmConfig.max_pool_bytes"
            )
        backoff = Backoff()
        while True:
            with self._lock:
                self._num_acquires += 1
                if self._num_acquires % 64 == 0:
                    self._trim(0)  # after a burst, give idle memory back even in steady state
                segment = self._take(capacity) or self._grow(capacity)
                if segment is None:
                    segment = self._take_any(num_bytes, state_of)
                if segment is not None:
                    segment.state[0] = SENT
                    segment.holder = peer
                    segment.last_used_s = time.monotonic()
                    self._classes[segment.capacity_bytes].move_to_end(segment.seq)
                    self._hot[segment.capacity_bytes] = segment
                    return segment
            if not backoff.sleep(deadline):
                busy = {s.holder for s in self.segments() if s.state[0] != FREE}
                raise XcclTimeout(
                    f"no free shm segment for {num_bytes} bytes: "
                    f"{self.num_bytes} bytes held by {sorted(busy)}"
                )

    def abandon(self, segment: Segment) -> None:
        """Give back a segment whose message was never announced."""
        segment.state[0] = FREE

    def close(self, linger_s: float, state_of: Callable[[str], PeerState]) -> None:
        """Wait (bounded) until live receivers mapped what was sent, then unlink everything."""
        deadline = time.monotonic() + linger_s
        backoff = Backoff(max_s=0.01)
        while backoff.sleep(deadline):
            holders = {s.holder for s in self.segments() if s.state[0] == SENT}
            if not any(state_of(holder) is PeerState.ALIVE for holder in holders):
                break
        with self._lock:
            for segment in self.segments():
                segment.destroy()
            self._classes.clear()
            self._hot.clear()
            self.num_bytes = 0

    def _take(self, capacity: int) -> Segment | None:
        hot = self._hot.get(capacity)
        if hot is not None and hot.state[0] == FREE:
            return hot  # the last one used: its pages are likely still in cache
        oldest = next(iter(self._classes.get(capacity, {}).values()), None)
        return oldest if oldest is not None and oldest.state[0] == FREE else None

    def _take_any(self, num_bytes: int, state_of: Callable[[str], PeerState]) -> Segment | None:
        """Full scan when the pool is full: any free segment that fits, after reclaiming."""
        for reclaim in (False, True):
            if reclaim and not self._reclaim(state_of):
                return None
            fitting = [
                s for s in self.segments() if s.state[0] == FREE and s.capacity_bytes >= num_bytes
            ]
            if fitting:
                return min(fitting, key=lambda s: s.capacity_bytes)
        return None

    def _grow(self, capacity: int) -> Segment | None:
        if self.num_bytes + capacity > self._config.max_pool_bytes:
            self._trim(capacity)
            if self.num_bytes + capacity > self._config.max_pool_bytes:
                return None
        self._seq += 1
        path = self._shm_dir / f"{self._prefix}-{self._seq:x}.seg"
        try:
            segment = Segment(path, capacity, self._seq)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise BackendUnavailable(f"cannot create segment {path}: {exc}") from exc
            self._trim(self._config.max_pool_bytes)  # every idle segment goes; then retry once
            try:
                segment = Segment(path, capacity, self._seq)
            except OSError:
                raise BackendUnavailable(
                    f"{self._shm_dir} has no room for a {capacity}-byte segment: make it bigger "
                    "(Docker: --shm-size; Kubernetes: emptyDir medium Memory sizeLimit) or "
                    "lower ShmConfig.max_pool_bytes"
                ) from exc
        self._classes.setdefault(capacity, OrderedDict())[segment.seq] = segment
        self.num_bytes += capacity
        return segment

    def _trim(self, extra_bytes: int) -> None:
        """Unlink least recently used idle segments that block growth or exceed the idle cap."""
        idle = sorted(
            (s for s in self.segments() if s.state[0] == FREE), key=lambda s: s.last_used_s
        )
        idle_bytes = sum(s.capacity_bytes for s in idle)
        while idle and (
            self.num_bytes + extra_bytes > self._config.max_pool_bytes
            or idle_bytes > self._config.max_idle_pool_bytes
        ):
            victim = idle.pop(0)
            idle_bytes -= victim.capacity_bytes
            self.num_bytes -= victim.capacity_bytes
            del self._classes[victim.capacity_bytes][victim.seq]
            if self._hot.get(victim.capacity_bytes) is victim:
                del self._hot[victim.capacity_bytes]
            victim.destroy()

    def _reclaim(self, state_of: Callable[[str], PeerState]) -> bool:
        """Free segments whose holder died; True when one was freed.

        A MAPPED segment is taken back only from a GONE holder (died without closing): a holder
        that closed normally may still have tensors viewing it, which release it when dropped.
        """
        busy = [s for s in self.segments() if s.state[0] != FREE]
        holder_states = {holder: state_of(holder) for holder in {s.holder for s in busy}}
        freed = False
        for segment in busy:
            holder_state = holder_states[segment.holder]
            if holder_state is PeerState.GONE or (
                segment.state[0] == SENT and holder_state is not PeerState.ALIVE
            ):
                segment.state[0] = FREE
                freed = True
        return freed


def _release(state: memoryview) -> None:
    state[0] = FREE


class MappingCache:
    """The receiver's LRU of mapped peer segments. Used only by the progress thread."""

    def __init__(self, shm_dir: Path, max_entries: int) -> None:
        self._shm_dir = shm_dir
        self._max_entries = max_entries
        self._maps: OrderedDict[str, tuple[mmap.mmap, memoryview]] = OrderedDict()

    def view(self, name: str, offset: int, num_bytes: int) -> npt.NDArray[np.uint8]:
        """The payload as a numpy view; its collection hands the segment back to the sender."""
        if parse_name(name) is None or "/" in name:
            raise FrameError(f"segment name {name!r} is not an xccl segment")
        entry = self._maps.get(name)
        if entry is None:
            try:
                mm = _map(self._shm_dir / name)
            except FileNotFoundError:
                raise MessageLost(f"segment {name} was removed before it was mapped") from None
            entry = (mm, _state_words(mm))
            self._maps[name] = entry
            while len(self._maps) > self._max_entries:
                self._maps.popitem(last=False)  # live views keep their mapping alive
        self._maps.move_to_end(name)
        mm, state = entry
        if offset < SEGMENT_HEADER_BYTES or offset + num_bytes > len(mm):
            raise FrameError(f"payload [{offset}, +{num_bytes}) is outside segment {name}")
        array = np.frombuffer(mm, np.uint8, num_bytes, offset)
        state[0] = MAPPED
        weakref.finalize(array, _release, state)
        return array

    def clear(self) -> None:
        self._maps.clear()
