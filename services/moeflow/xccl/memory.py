"""In-process XCCL backend: endpoints sharing one `MemoryHub` exchange tensors through queues.

The fake of the Protocol + fake + real triple (one contract suite runs against all): for unit
tests of the engine and gateway and for single-process runs, with no files, sockets or servers.
It keeps the contract of base.py (tests/integration/xccl/test_contract.py runs against it too):
`send` clones the tensors, so a receiver never aliases the sender's memory, exactly as across
processes; a peer is alive while its endpoint is open, and closing it is the only way to "die".
Endpoints of different hubs never see each other; `make_transport("memory", ...)` without a hub
uses one per process.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

from moeflow.xccl.base import EndpointBase
from moeflow.xccl.errors import PeerGone, RankInUse, XcclTimeout
from moeflow.xccl.tensors import layout_of


class MemoryHub:
    """The shared medium: which endpoints are open and the messages queued for them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.live: set[tuple[str, str]] = set()
        """(group, rank) of every open endpoint."""
        self.queues: dict[tuple[str, str, str, str], deque[list[torch.Tensor]]] = {}
        """(group, receiver, sender, tag) -> messages in send order."""

    def contents(self, group: str) -> list[str]:
        """What the group still holds (open endpoints, queued messages), for leak checks."""
        with self.cond:
            ranks = [f"endpoint {r}" for g, r in self.live if g == group]
            queued = [f"queue {k[1]}<-{k[2]}:{k[3]}" for k in self.queues if k[0] == group]
        return sorted(ranks + queued)


_PROCESS_HUB = MemoryHub()


class MemoryTransport(EndpointBase):
    """Endpoint of the in-process backend. See the module docstring."""

    def __init__(self, group: str, rank: str, hub: MemoryHub | None = None) -> None:
        super().__init__(group, rank)
        self._hub = hub or _PROCESS_HUB
        self._seen_alive: set[str] = set()
        with self._hub.cond:
            if (group, rank) in self._hub.live:
                raise RankInUse(f"rank {rank!r} of group {group!r} is open in this hub")
            self._hub.live.add((group, rank))
            self._hub.cond.notify_all()  # senders waiting for us to appear

    def _send_by(self, peer: str, tag: str, tensors: list[torch.Tensor], deadline: float) -> None:
        self.check_open()
        layout_of(tensors)  # the same dtype and type checks as the real backends
        message = [
            t.detach().to("cpu").clone(memory_format=torch.contiguous_format) for t in tensors
        ]
        hub = self._hub
        with hub.cond:
            while (self.group, peer) not in hub.live:
                if peer in self._seen_alive:
                    raise PeerGone(peer, "its endpoint closed")
                self._wait(deadline, f"peer {peer!r} did not open its endpoint")
            self._seen_alive.add(peer)
            hub.queues.setdefault((self.group, peer, self.rank, tag), deque()).append(message)
            hub.cond.notify_all()

    def _recv_by(self, peer: str, tag: str, deadline: float) -> list[torch.Tensor]:
        hub = self._hub
        key = (self.group, self.rank, peer, tag)
        with hub.cond:
            while True:
                self.check_open()
                queue = hub.queues.get(key)
                if queue:
                    message = queue.popleft()
                    if not queue:
                        del hub.queues[key]
                    self._seen_alive.add(peer)
                    return message
                if (self.group, peer) in hub.live:
                    self._seen_alive.add(peer)
                elif peer in self._seen_alive:
                    raise PeerGone(peer, f"its endpoint closed before it sent {tag!r}")
                self._wait(deadline, f"no message {tag!r} from {peer!r} within the timeout")

    def _wait(self, deadline: float, reason: str) -> None:
        """Wait on the hub (caller holds its condition) or raise XcclTimeout(reason)."""
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise XcclTimeout(reason)
        self._hub.cond.wait(remaining_s)
        self.check_open()

    def _close(self) -> None:
        hub = self._hub
        with hub.cond:
            hub.live.discard((self.group, self.rank))
            for key in [k for k in hub.queues if k[:2] == (self.group, self.rank)]:
                del hub.queues[key]  # unconsumed messages addressed to us
            hub.cond.notify_all()  # our waiters raise TransportClosed, peers' see us gone
