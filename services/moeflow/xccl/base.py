"""The `Transport` contract that every XCCL backend implements, and their shared plumbing.

An *endpoint* is one (group, rank): `group` is a namespace (e.g. a model name) so that several
deployments share one Redis or one /dev/shm; `rank` names the endpoint inside it ("prefill-0").
The engine calls endpoints synchronously from its compute thread; every blocking call takes an
explicit `timeout_s` (>= 0; 0 means "only what is already there") and returns or raises about
when it expires (a Redis server that stops answering mid-call is bounded by
`RedisConfig.socket_timeout_s` instead). Endpoints are thread-safe.

Semantics, identical for every backend (tests/integration/xccl/test_contract.py enforces them):

- A *message* is the list of tensors of one `send(peer, tag, tensors)`. `recv(peer, tag)` returns
  the oldest message from `peer` under exactly that `tag`; messages of other peers or tags are
  never returned, reordered or dropped by it. Messages on one (sender, receiver, tag) arrive in
  send order; across tags there is no order.
- `send` is buffered: it returns once the message is queued for the peer, not when the peer has
  received it. It waits (up to `timeout_s`) for a peer that has not opened its endpoint yet, and
  for buffer space when receivers hold too much (shm: `ShmConfig.max_pool_bytes`).
- Messages a peer sent before closing normally stay receivable (shm: a live receiver takes
  them over at once; redis: for `message_ttl_s`). A peer that vanishes (closed or killed) makes
  a pending `recv` from it raise `PeerGone` instead of waiting for the timeout (shm: within
  `liveness_interval_s`; redis: within `liveness_ttl_s`), provided this endpoint saw it alive
  before; otherwise the call ends in `XcclTimeout`. A `send` to a vanished peer raises too.
- Received tensors keep dtype and shape, live on the CPU, and may be views of transport memory
  (shm): holding them pins transport buffers, so `clone()` what you keep for long.
- `close()` is idempotent, frees everything this endpoint created (shm segments, Redis keys,
  threads), drops unconsumed inbound messages, and makes further calls raise `TransportClosed`.

What this module must not do: touch any medium (files, sockets, Redis). Backends do that.
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Protocol, Self

import torch

from moeflow.xccl.errors import TransportClosed
from moeflow.xccl.messages import check_name

TensorSpec = tuple[torch.dtype, tuple[int, ...]]
"""The dtype and shape of one tensor of a message that `send_into` fills in place."""


class Transport(Protocol):
    """One endpoint of an XCCL group. See the module docstring for the full contract."""

    @property
    def group(self) -> str: ...

    @property
    def rank(self) -> str: ...

    def send(self, peer: str, tag: str, tensors: Sequence[torch.Tensor], timeout_s: float) -> None:
        """Queue one message for `peer`. Raises XcclTimeout, PeerGone, TransportClosed."""
        ...

    def send_into(
        self,
        peer: str,
        tag: str,
        specs: Sequence[TensorSpec],
        fill: Callable[[list[torch.Tensor]], None],
        timeout_s: float,
    ) -> None:
        """`send` of tensors that `fill` writes in place, given their (dtype, shape): shm hands
        `fill` views of the message's segment, so producing the payload is its only copy."""
        ...

    def recv(self, peer: str, tag: str, timeout_s: float) -> list[torch.Tensor]:
        """Take the oldest message from `peer` under `tag`. Raises XcclTimeout, PeerGone, ..."""
        ...

    def broadcast(
        self, peers: Sequence[str], tag: str, tensors: Sequence[torch.Tensor], timeout_s: float
    ) -> None:
        """Send the same message to every peer in `peers` (one deadline for all)."""
        ...

    def dispatch(
        self, tag: str, per_peer: Mapping[str, Sequence[torch.Tensor]], timeout_s: float
    ) -> None:
        """All-to-all first half: send each peer its own slice under `tag` (self allowed)."""
        ...

    def combine(
        self, tag: str, peers: Sequence[str], timeout_s: float
    ) -> dict[str, list[torch.Tensor]]:
        """All-to-all second half: one message under `tag` from every peer in `peers`."""
        ...

    def close(self) -> None:
        """Release everything this endpoint owns; idempotent."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def deadline_after(timeout_s: float) -> float:
    """Absolute `time.monotonic()` deadline for a relative timeout (validated)."""
    if not isinstance(timeout_s, int | float) or math.isnan(timeout_s) or timeout_s < 0:
        raise ValueError(f"timeout_s must be a number >= 0, got {timeout_s!r}")
    return time.monotonic() + timeout_s


class Backoff:
    """Sleep schedule for polling loops: starts at `min_s`, doubles up to `max_s`.

    Busy-polling starves the peer process on a 2-core host, so waits always sleep; the first
    sleeps are short to keep latency low when the condition is about to become true.
    """

    def __init__(self, min_s: float = 50e-6, max_s: float = 2e-3) -> None:
        self._next_s = min_s
        self._max_s = max_s

    def sleep(self, deadline: float) -> bool:
        """Sleep one step but never past `deadline`; False when the deadline has passed."""
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            return False
        time.sleep(min(self._next_s, remaining_s))
        self._next_s = min(self._next_s * 2, self._max_s)
        return True


class EndpointBase(ABC):
    """Argument checks, deadlines, close-once and the collectives, over `_send_by`/`_recv_by`.

    Backends implement the two point-to-point primitives against an absolute deadline and may
    override a collective when they can do better (e.g. one Redis pipeline for all peers).
    """

    def __init__(self, group: str, rank: str) -> None:
        self._group = check_name("group", group)
        self._rank = check_name("rank", rank)
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def group(self) -> str:
        return self._group

    @property
    def rank(self) -> str:
        return self._rank

    @property
    def is_closed(self) -> bool:
        return self._closed

    def send(self, peer: str, tag: str, tensors: Sequence[torch.Tensor], timeout_s: float) -> None:
        deadline = deadline_after(timeout_s)
        self._send_by(check_name("peer", peer), check_name("tag", tag), _listed(tensors), deadline)

    def send_into(
        self,
        peer: str,
        tag: str,
        specs: Sequence[TensorSpec],
        fill: Callable[[list[torch.Tensor]], None],
        timeout_s: float,
    ) -> None:
        deadline = deadline_after(timeout_s)
        self._send_into_by(check_name("peer", peer), check_name("tag", tag), list(specs), fill,
                           deadline)

    def _send_into_by(
        self,
        peer: str,
        tag: str,
        specs: list[TensorSpec],
        fill: Callable[[list[torch.Tensor]], None],
        deadline: float,
    ) -> None:
        """Fill private tensors, then send them; backends with writable buffers override this."""
        tensors = [torch.empty(shape, dtype=dtype) for dtype, shape in specs]
        fill(tensors)
        self._send_by(peer, tag, tensors, deadline)

    def recv(self, peer: str, tag: str, timeout_s: float) -> list[torch.Tensor]:
        deadline = deadline_after(timeout_s)
        self.check_open()
        return self._recv_by(check_name("peer", peer), check_name("tag", tag), deadline)

    def broadcast(
        self, peers: Sequence[str], tag: str, tensors: Sequence[torch.Tensor], timeout_s: float
    ) -> None:
        deadline = deadline_after(timeout_s)
        listed = _listed(tensors)
        for peer in _unique(peers):
            self._send_by(peer, check_name("tag", tag), listed, deadline)

    def dispatch(
        self, tag: str, per_peer: Mapping[str, Sequence[torch.Tensor]], timeout_s: float
    ) -> None:
        deadline = deadline_after(timeout_s)
        for peer, tensors in per_peer.items():
            self._send_by(
                check_name("peer", peer), check_name("tag", tag), _listed(tensors), deadline
            )

    def combine(
        self, tag: str, peers: Sequence[str], timeout_s: float
    ) -> dict[str, list[torch.Tensor]]:
        deadline = deadline_after(timeout_s)
        self.check_open()
        # Messages are buffered on arrival, so waiting peer by peer costs no more than waiting
        # for all at once: the total is bounded by the last arrival either way.
        return {
            peer: self._recv_by(peer, check_name("tag", tag), deadline) for peer in _unique(peers)
        }

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._close()

    def check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"endpoint {self._rank!r} of group {self._group!r} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"{type(self).__name__}(group={self._group!r}, rank={self._rank!r}, {state})"

    @abstractmethod
    def _send_by(self, peer: str, tag: str, tensors: list[torch.Tensor], deadline: float) -> None:
        """Queue one message for `peer` before the monotonic `deadline`."""

    @abstractmethod
    def _recv_by(self, peer: str, tag: str, deadline: float) -> list[torch.Tensor]:
        """Take the oldest (peer, tag) message before the monotonic `deadline`."""

    @abstractmethod
    def _close(self) -> None:
        """Release resources; called exactly once, after `is_closed` became True."""


def _listed(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    # A bare tensor is a Sequence of its rows; sending it that way is always a bug.
    if isinstance(tensors, torch.Tensor):
        raise TypeError("pass a list of tensors, not a bare tensor")
    return list(tensors)


def _unique(peers: Sequence[str]) -> list[str]:
    names = [check_name("peer", p) for p in peers]
    if len(set(names)) != len(names):
        raise ValueError(f"peers must be distinct, got {names}")
    return names
