"""Shared-memory rings (moeflow.xccl.ring) between real processes: order and payloads, the
doorbell that wakes an idle receiver (which burns no core), a killed peer, a restarted one, and
the round-trip latency with and without the spin window (printed; the bound is loose)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moeflow.xccl import ShmConfig, Transport, make_transport
from moeflow.xccl.errors import PeerGone
from moeflow.xccl.ring import RingEndpoint, ring_path

PEER = Path(__file__).with_name("ring_peer.py")
CONFIG = ShmConfig(liveness_interval_s=0.05)


class Peer:
    def __init__(self, group: str, spin_us: int) -> None:
        self.process = subprocess.Popen([sys.executable, str(PEER), group, str(spin_us)],
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def group() -> Iterator[str]:
    name = f"ring-{uuid.uuid4().hex[:8]}"
    yield name
    # a killed peer cannot remove its inbound ring (a restarted one would replace it)
    for path in CONFIG.shm_dir.glob(f"xring@{name}@*"):
        path.unlink()


@pytest.fixture
def main_transport(group: str) -> Iterator[Transport]:
    with make_transport("shm", group, "main", shm_config=CONFIG) as transport:
        yield transport


def open_main(transport: Transport, spin_us: int) -> RingEndpoint:
    return RingEndpoint(transport, CONFIG.shm_dir, ["peer"], spin_s=spin_us / 1e6,
                        capacity=1 << 20)


def test_messages_round_trip_in_order_with_their_dtypes_and_shapes(
    group: str, main_transport: Transport
) -> None:
    ring = open_main(main_transport, 200)
    peer = Peer(group, 200)
    try:
        sent = []
        for i in range(60):
            message = [torch.tensor([i, 7], dtype=torch.int64), torch.randn(i % 5, 3),
                       torch.arange(i % 3, dtype=torch.int32), torch.randn(2, dtype=torch.bfloat16)]
            if i % 20 == 0:  # over a quarter of the ring: travels on the transport, in order
                message.append(torch.randn(300_000))
            ring.send("peer", "ping", message, 5.0)
            sent.append(message)
        for message in sent:
            echoed = ring.recv("peer", "pong", 5.0)
            assert len(echoed) == len(message)
            for a, b in zip(echoed, message, strict=True):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        ring.send("peer", "ping", [], 5.0)
        assert peer.process.wait(timeout=10) == 0
    finally:
        peer.stop()
        ring.close()
    assert not ring_path(CONFIG.shm_dir, group, "peer", "main").exists()


def test_an_idle_receiver_sleeps_and_a_doorbell_wakes_it(
    group: str, main_transport: Transport
) -> None:
    ring = open_main(main_transport, 200)
    peer = Peer(group, 200)
    try:
        ring.send("peer", "ping", [torch.ones(1)], 5.0)
        ring.recv("peer", "pong", 5.0)
        before = peer.cpu_s()
        time.sleep(1.0)  # the peer's spin window ended long ago: it blocks on its transport
        idle_cpu_s = peer.cpu_s() - before
        started = time.monotonic()
        ring.send("peer", "ping", [torch.ones(1)], 5.0)
        ring.recv("peer", "pong", 5.0)
        wake_s = time.monotonic() - started
    finally:
        peer.stop()
        ring.close()
    assert idle_cpu_s < 0.1, f"an idle receiver used {idle_cpu_s:.2f} s of CPU in 1 s"
    assert wake_s < 0.5, f"the doorbell took {wake_s:.3f} s (the receiver waits up to 5 s)"


def test_a_killed_peer_surfaces_as_peer_gone_and_a_restarted_one_is_reached(
    group: str, main_transport: Transport
) -> None:
    ring = open_main(main_transport, 200)
    peer = Peer(group, 200)
    try:
        ring.send("peer", "ping", [torch.ones(1)], 5.0)
        ring.recv("peer", "pong", 5.0)
        peer.process.kill()
        started = time.monotonic()
        with pytest.raises(PeerGone):
            ring.recv("peer", "pong", 10.0)
        assert time.monotonic() - started < 2.0
        peer.stop()
        peer = Peer(group, 200)  # re-creates its ring: the sender maps the new one
        ring.send("peer", "ping", [torch.full((3,), 5.0)], 5.0)
        assert torch.equal(ring.recv("peer", "pong", 5.0)[0], torch.full((3,), 5.0))
    finally:
        peer.stop()
        ring.close()


def _round_trips(send: object, recv: object, n: int) -> float:
    assert callable(send) and callable(recv)
    hidden = torch.randn(16, 576)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        send("peer", "ping", [hidden], 5.0)
        recv("peer", "pong", 5.0)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def test_round_trip_latency_ring_and_transport(group: str, main_transport: Transport) -> None:
    peer = Peer(group, 0)
    try:
        transport_ms = _round_trips(main_transport.send, main_transport.recv, 300)
        main_transport.send("peer", "ping", [], 5.0)
        assert peer.process.wait(timeout=10) == 0
    finally:
        peer.stop()
    ring = open_main(main_transport, 500)
    peer = Peer(group, 500)
    try:
        ring_ms = _round_trips(ring.send, ring.recv, 300)
    finally:
        peer.stop()
        ring.close()
    print(f"\nround trip, median: transport {transport_ms:.3f} ms, ring (spin 500 us) "
          f"{ring_ms:.3f} ms (load {os.getloadavg()[0]:.1f})")
    assert ring_ms < 50 and transport_ms < 50
