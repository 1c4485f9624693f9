"""What only the shm backend promises: segment reuse, zero-copy views, stale-file recovery."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moeflow.xccl import PayloadTooLarge, PeerGone, ShmConfig, XcclTimeout
from moeflow.xccl.shm import ShmTransport
from moeflow.xccl.shm_names import parse_name, remove_stale, socket_path

pytestmark = pytest.mark.timeout(30)

SHM_DIR = Path("/dev/shm")
MIB = 1 << 20


@pytest.fixture
def group() -> str:
    return f"shm-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pair(group: str) -> Iterator[tuple[ShmTransport, ShmTransport]]:
    config = ShmConfig(max_pool_bytes=8 * MIB, max_idle_pool_bytes=4 * MIB, close_linger_s=0.5)
    a, b = ShmTransport(group, "a", config), ShmTransport(group, "b", config)
    yield a, b
    a.close()
    b.close()


def files_of(group: str) -> list[str]:
    return sorted(p.name for p in SHM_DIR.iterdir() if (parse_name(p.name) or ("",))[0] == group)


def fake_dead_endpoint(group: str, rank: str) -> list[Path]:
    """What a SIGKILLed endpoint leaves: a socket file nobody listens on, and a segment."""
    path = socket_path(SHM_DIR, group, rank)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(path))  # closed without unlink, as after a kill
    segment = path.with_name(path.name.removesuffix(".sock") + "@dead-1.seg")
    segment.write_bytes(b"\x00" * 4096)
    return [path, segment]


def test_a_receiver_that_drops_its_tensors_lets_the_sender_reuse_one_segment(
    pair: tuple[ShmTransport, ShmTransport], group: str
) -> None:
    a, b = pair
    for i in range(20):
        a.send("b", "kv", [torch.full((MIB,), i, dtype=torch.uint8)], timeout_s=5)
        (got,) = b.recv("a", "kv", timeout_s=5)
        assert int(got[0]) == i
        del got
    assert a._pool.num_bytes <= 2 * MIB
    assert len([f for f in files_of(group) if f.endswith(".seg")]) <= 2


def test_received_tensors_view_the_segment_and_pin_it_until_dropped(
    pair: tuple[ShmTransport, ShmTransport],
) -> None:
    a, b = pair
    held = []
    for i in range(8):  # 8 x 1 MiB fills the 8 MiB pool
        a.send("b", f"t{i}", [torch.full((MIB - 64,), i, dtype=torch.uint8)], timeout_s=5)
        held.append(b.recv("a", f"t{i}", timeout_s=5)[0])
    with pytest.raises(XcclTimeout, match="no free shm segment"):
        a.send("b", "over", [torch.zeros(MIB - 64, dtype=torch.uint8)], timeout_s=0.2)
    assert [int(t[0]) for t in held] == list(range(8))  # nothing was overwritten
    del held[3]
    gc.collect()
    a.send("b", "over", [torch.zeros(MIB - 64, dtype=torch.uint8)], timeout_s=5)
    assert int(b.recv("a", "over", timeout_s=5)[0].sum()) == 0


def test_received_views_stay_valid_after_the_sender_closed(
    pair: tuple[ShmTransport, ShmTransport], group: str
) -> None:
    a, b = pair
    sent = torch.randn(MIB)
    a.send("b", "t", [sent], timeout_s=5)
    (got,) = b.recv("a", "t", timeout_s=5)
    a.close()
    assert not [f for f in files_of(group) if "@a@" in f]
    assert torch.equal(got, sent)


def test_small_payloads_ride_in_the_datagram_and_create_no_segment(
    pair: tuple[ShmTransport, ShmTransport], group: str
) -> None:
    a, b = pair
    a.send("b", "small", [torch.zeros(64 << 10, dtype=torch.uint8)], timeout_s=5)
    assert torch.equal(
        b.recv("a", "small", timeout_s=5)[0], torch.zeros(64 << 10, dtype=torch.uint8)
    )
    assert not [f for f in files_of(group) if f.endswith(".seg")]
    a.send("b", "big", [torch.zeros((64 << 10) + 1, dtype=torch.uint8)], timeout_s=5)
    b.recv("a", "big", timeout_s=5)
    assert [f for f in files_of(group) if f.endswith(".seg")]


def test_garbage_datagrams_are_dropped_and_the_endpoint_keeps_working(
    pair: tuple[ShmTransport, ShmTransport], group: str
) -> None:
    a, b = pair
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"GET / HTTP/1.1\r\n\r\n", os.fspath(socket_path(SHM_DIR, group, "b")))
    a.send("b", "t", [torch.ones(2)], timeout_s=5)
    assert torch.equal(b.recv("a", "t", timeout_s=5)[0], torch.ones(2))


def test_checksummed_transfers_round_trip(group: str) -> None:
    config = ShmConfig(checksum=True)
    with ShmTransport(group, "a", config) as a, ShmTransport(group, "b", config) as b:
        for size in (10, 300_000):
            sent = torch.randn(size)
            a.send("b", "t", [sent], timeout_s=5)
            assert torch.equal(b.recv("a", "t", timeout_s=5)[0], sent)


def test_stale_files_of_a_dead_endpoint_are_removed_and_live_ones_kept(group: str) -> None:
    stale = fake_dead_endpoint(group, "dead")
    with ShmTransport(group, "alive") as alive, ShmTransport(group, "peer") as peer:
        alive.send("peer", "t", [torch.zeros(MIB)], timeout_s=5)  # gives "alive" a segment
        before = set(files_of(group))
        removed = remove_stale(SHM_DIR, group)
        assert sorted(removed) == sorted(stale)
        assert set(files_of(group)) == before - {p.name for p in stale}
        assert peer.recv("alive", "t", timeout_s=5)[0].shape == (MIB,)
    assert files_of(group) == []


def test_a_new_endpoint_takes_over_the_rank_of_a_dead_one(group: str) -> None:
    stale = fake_dead_endpoint(group, "prefill-0")
    with ShmTransport(group, "prefill-0") as reborn, ShmTransport(group, "decode-0") as peer:
        assert not stale[1].exists()  # the predecessor's segment was swept
        reborn.send("decode-0", "t", [torch.arange(3)], timeout_s=5)
        assert peer.recv("prefill-0", "t", timeout_s=5)[0].tolist() == [0, 1, 2]
    assert files_of(group) == []


def test_names_too_long_for_a_socket_path_are_refused() -> None:
    with pytest.raises(ValueError, match="shorter"):
        ShmTransport("g" * 60, "r" * 60)


def test_send_into_writes_in_place_in_a_reused_segment_and_the_receiver_reads_it_there(
    pair: tuple[ShmTransport, ShmTransport], group: str
) -> None:
    a, b = pair
    addresses = set()
    for i in range(10):
        def fill(views: list[torch.Tensor], i: int = i) -> None:
            addresses.add(views[0].data_ptr())
            views[0].fill_(i)

        a.send_into("b", "kv", [(torch.float32, (2, MIB // 16))], fill, timeout_s=5)
        (got,) = b.recv("a", "kv", timeout_s=5)
        assert int(got[1, -1]) == i
        del got
    assert len(addresses) == 1  # one segment of the ring, reused for every message
    assert len([f for f in files_of(group) if f.endswith(".seg")]) == 1


def test_a_message_bigger_than_the_pool_fails_at_once_with_what_to_change(
    pair: tuple[ShmTransport, ShmTransport],
) -> None:
    a, b = pair
    with pytest.raises(PayloadTooLarge, match="max_pool_bytes"):
        a.send("b", "huge", [torch.zeros(9 * MIB, dtype=torch.uint8)], timeout_s=5)
    a.send("b", "fits", [torch.zeros(4 * MIB, dtype=torch.uint8)], timeout_s=5)  # the fallback
    assert b.recv("a", "fits", timeout_s=5)[0].numel() == 4 * MIB


def test_a_full_ring_times_out_then_reuses_the_segment_a_receiver_released(
    pair: tuple[ShmTransport, ShmTransport],
) -> None:
    a, b = pair
    held = []
    for i in range(4):  # 4 x 2 MiB fill the 8 MiB ring
        a.send("b", "t", [torch.full((2 * MIB - 64,), i, dtype=torch.uint8)], timeout_s=5)
        held.append(b.recv("a", "t", timeout_s=5)[0])
    with pytest.raises(XcclTimeout, match="held by \\['b'\\]"):
        a.send("b", "t", [torch.zeros(2 * MIB - 64, dtype=torch.uint8)], timeout_s=0.2)
    del held[0]
    gc.collect()
    a.send("b", "t", [torch.full((2 * MIB - 64,), 9, dtype=torch.uint8)], timeout_s=5)
    assert int(b.recv("a", "t", timeout_s=5)[0][0]) == 9
    assert a._pool.num_bytes <= 8 * MIB


def test_a_receiver_killed_while_holding_segments_gives_them_back_to_the_ring(
    group: str, tmp_path: Path
) -> None:
    config = ShmConfig(max_pool_bytes=4 * MIB, max_idle_pool_bytes=4 * MIB, close_linger_s=0.5,
                       liveness_interval_s=0.05)
    script = tmp_path / "holder.py"
    script.write_text(
        "import sys, time\n"
        "from moeflow.xccl.shm import ShmTransport\n"
        f"b = ShmTransport({group!r}, 'b')\n"
        "held = [b.recv('a', 't', 30)[0] for _ in range(2)]\n"
        "print('holding', flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        with ShmTransport(group, "a", config) as a:
            for _ in range(2):  # 2 x 2 MiB: the whole ring, pinned by the child
                a.send("b", "t", [torch.ones(2 * MIB - 64, dtype=torch.uint8)], timeout_s=20)
            assert child.stdout is not None and child.stdout.readline().strip() == "holding"
            child.kill()  # SIGKILL: its views are never dropped, its socket stays behind
            child.wait()
            with pytest.raises(PeerGone):
                a.send("b", "t", [torch.ones(2 * MIB - 64, dtype=torch.uint8)], timeout_s=5)
            # a restarted receiver of the same rank gets the reclaimed segments
            with ShmTransport(group, "b") as reborn:
                a.send("b", "t", [torch.full((2 * MIB - 64,), 7, dtype=torch.uint8)],
                       timeout_s=5)
                assert int(reborn.recv("a", "t", timeout_s=5)[0][-1]) == 7
            assert a._pool.num_bytes <= 4 * MIB
    finally:
        child.kill()
        child.wait()
    assert files_of(group) == []
