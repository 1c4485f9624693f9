"""The `Transport` contract (moeflow/xccl/base.py), run against every backend.

Each test gets endpoints of one backend ("shm" on the real /dev/shm, "redis" on a real
redis-server) in a group of its own. Endpoints in one process talk across threads; the
two-process test spawns a real child and kills it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from moeflow.xccl import PeerGone, RankInUse, Transport, TransportClosed, XcclTimeout

pytestmark = pytest.mark.timeout(60)

Open = Callable[[str], Transport]

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
SHAPES = [(), (0,), (3, 0, 2), (1,), (5, 7), (2, 3, 4)]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 100).to(dtype)
    return torch.randint(
        -100 if dtype != torch.uint8 else 0, 100, shape, generator=generator, dtype=dtype
    )


def assert_same(got: list[torch.Tensor], sent: list[torch.Tensor]) -> None:
    assert len(got) == len(sent)
    for g, s in zip(got, sent, strict=True):
        assert g.dtype == s.dtype and g.shape == s.shape and g.device.type == "cpu"
        assert torch.equal(g, s.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_recv_returns_the_sent_tensors_with_dtype_shape_and_values(
    open_endpoint: Open, dtype: torch.dtype
) -> None:
    a, b = open_endpoint("a"), open_endpoint("b")
    small = [sample(dtype, shape, seed=i) for i, shape in enumerate(SHAPES)]
    # Past the inline limit of shm and the chunk size of redis, and not contiguous.
    large = sample(dtype, (1100, 700), seed=9).t()
    for tensors in (small, [*small, large], [large], []):
        a.send("b", "t", tensors, timeout_s=10)
        assert_same(b.recv("a", "t", timeout_s=10), tensors)


def test_a_64_mib_tensor_arrives_intact(open_endpoint: Open) -> None:
    a, b = open_endpoint("a"), open_endpoint("b")
    big = torch.arange(16 << 20, dtype=torch.int32)
    a.send("b", "kv/big", [big, big[:5]], timeout_s=30)
    got = b.recv("a", "kv/big", timeout_s=30)
    assert_same(got, [big, big[:5]])


def test_send_into_delivers_what_fill_wrote_in_the_given_layout(open_endpoint: Open) -> None:
    a, b = open_endpoint("a"), open_endpoint("b")
    for shapes in ([(2, 3)], [(2, 300, 4, 16), (0,), (5,)], []):  # inline, segment, empty
        sent = [sample(torch.float32, shape, seed=i) for i, shape in enumerate(shapes)]
        seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

        def fill(views: list[torch.Tensor], sent: list[torch.Tensor] = sent,
                 seen: list[tuple[torch.dtype, tuple[int, ...]]] = seen) -> None:
            seen.extend((v.dtype, tuple(v.shape)) for v in views)
            for view, tensor in zip(views, sent, strict=True):
                view.copy_(tensor)

        a.send_into("b", "t", [(t.dtype, tuple(t.shape)) for t in sent], fill, timeout_s=10)
        assert seen == [(t.dtype, tuple(t.shape)) for t in sent]
        assert_same(b.recv("a", "t", timeout_s=10), sent)


def test_a_send_into_whose_fill_raises_sends_nothing(open_endpoint: Open) -> None:
    a, b = open_endpoint("a"), open_endpoint("b")

    def fail(views: list[torch.Tensor]) -> None:
        raise RuntimeError("fill failed")

    with pytest.raises(RuntimeError, match="fill failed"):
        a.send_into("b", "t", [(torch.float32, (300, 300))], fail, timeout_s=10)
    a.send("b", "t", [torch.ones(3)], timeout_s=10)
    assert_same(b.recv("a", "t", timeout_s=10), [torch.ones(3)])


def test_messages_on_one_tag_arrive_in_send_order(open_endpoint: Open) -> None:
    a, b = open_endpoint("a"), open_endpoint("b")
    for i in range(40):
        size = 200_000 if i % 3 == 0 else 3  # mixes large and small payloads
        a.send("b", "stream", [torch.full((size,), i, dtype=torch.int64)], timeout_s=10)
    assert [int(b.recv("a", "stream", timeout_s=10)[0][0]) for _ in range(40)] == list(range(40))


def test_many_concurrent_tags_never_mix(open_endpoint: Open) -> None:
    a, b = open_endpoint("a"), open_endpoint("b")
    num_tags = 96

    def send_all() -> None:
        for i in range(num_tags):
            a.send("b", f"kv/{i}/0", [torch.full((i % 5 + 1, 64), i, dtype=torch.int32)], 10)

    def recv_some(worker: int) -> dict[int, int]:
        tags = range(num_tags - 1 - worker, -1, -4)  # reverse order, interleaved across workers
        return {i: int(b.recv("a", f"kv/{i}/0", timeout_s=20)[0].unique().item()) for i in tags}

    with ThreadPoolExecutor(5) as pool:
        receivers = [pool.submit(recv_some, w) for w in range(4)]
        pool.submit(send_all).result()
        got = {k: v for r in receivers for k, v in r.result().items()}
    assert got == {i: i for i in range(num_tags)}


def test_recv_never_takes_a_message_of_another_peer_or_tag(open_endpoint: Open) -> None:
    a, b, c = open_endpoint("a"), open_endpoint("b"), open_endpoint("c")
    a.send("b", "x", [torch.tensor([1])], timeout_s=5)
    c.send("b", "y", [torch.tensor([3])], timeout_s=5)
    with pytest.raises(XcclTimeout):
        b.recv("c", "x", timeout_s=0.2)
    with pytest.raises(XcclTimeout):
        b.recv("a", "y", timeout_s=0.2)
    assert b.recv("a", "x", timeout_s=5)[0].item() == 1
    assert b.recv("c", "y", timeout_s=0)[0].item() == 3


def test_recv_times_out_close_to_its_timeout(open_endpoint: Open) -> None:
    a, b = open_endpoint("a"), open_endpoint("b")
    a.send("b", "warm", [torch.zeros(1)], timeout_s=5)  # b has now seen a alive
    start = time.monotonic()
    with pytest.raises(XcclTimeout):
        b.recv("a", "never", timeout_s=0.3)
    assert 0.3 <= time.monotonic() - start < 1.0


def test_a_live_peer_that_stays_silent_times_out_rather_than_being_declared_gone(
    open_endpoint: Open,
) -> None:
    a, b = open_endpoint("a"), open_endpoint("b")
    a.send("b", "warm", [torch.zeros(1)], timeout_s=5)
    with pytest.raises(XcclTimeout):
        b.recv("a", "never", timeout_s=1.2)  # longer than the redis liveness TTL of 1 s


def test_send_to_a_peer_that_never_opens_times_out(open_endpoint: Open) -> None:
    a = open_endpoint("a")
    start = time.monotonic()
    with pytest.raises(XcclTimeout):
        a.send("nobody", "t", [torch.zeros(300_000)], timeout_s=0.3)
    assert time.monotonic() - start < 1.0


def test_send_waits_for_a_peer_that_opens_later(open_endpoint: Open) -> None:
    a = open_endpoint("a")
    late: list[Transport] = []
    timer = threading.Timer(0.2, lambda: late.append(open_endpoint("late")))
    timer.start()
    a.send("late", "t", [torch.ones(3)], timeout_s=5)
    timer.join()
    assert_same(late[0].recv("a", "t", timeout_s=5), [torch.ones(3)])


def test_broadcast_reaches_every_peer(open_endpoint: Open) -> None:
    root = open_endpoint("root")
    leaves = [open_endpoint(f"leaf-{i}") for i in range(3)]
    weights = [torch.randn(64, 64), torch.arange(10)]
    root.broadcast([leaf.rank for leaf in leaves], "weights", weights, timeout_s=10)
    for leaf in leaves:
        assert_same(leaf.recv("root", "weights", timeout_s=10), weights)


def test_dispatch_then_combine_is_an_all_to_all_among_four_ranks(open_endpoint: Open) -> None:
    ranks = [f"ep-{i}" for i in range(4)]
    endpoints = {rank: open_endpoint(rank) for rank in ranks}

    def token_block(src: int, dst: int) -> torch.Tensor:  # what rank src routes to rank dst
        return torch.full((src + dst + 1, 16), 10 * src + dst, dtype=torch.bfloat16)

    def layer(src: int) -> dict[str, list[torch.Tensor]]:
        endpoint = endpoints[ranks[src]]
        slices = {ranks[dst]: [token_block(src, dst)] for dst in range(4)}
        endpoint.dispatch("moe/layer-3", slices, timeout_s=20)
        return endpoint.combine("moe/layer-3", ranks, timeout_s=20)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(layer, range(4)))
    for dst, combined in enumerate(results):
        assert list(combined) == ranks
        for src in range(4):
            assert_same(combined[ranks[src]], [token_block(src, dst)])


def test_close_leaves_no_segments_or_keys(
    open_endpoint: Open, leftovers: Callable[[], list[str]]
) -> None:
    a, b = open_endpoint("a"), open_endpoint("b")
    for i in range(3):
        a.send("b", f"t{i}", [torch.zeros(3 << 20), torch.ones(7)], timeout_s=10)
    got = [b.recv("a", f"t{i}", timeout_s=10) for i in range(2)]  # t2 stays unconsumed
    assert leftovers()
    del got
    b.close()
    a.close()
    assert leftovers() == []


def test_a_closed_endpoint_refuses_calls_and_wakes_its_waiters(open_endpoint: Open) -> None:
    a, b = open_endpoint("a"), open_endpoint("b")
    a.send("b", "hello", [torch.ones(1)], timeout_s=5)
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(b.recv, "a", "never", 30.0)
        time.sleep(0.2)
        start = time.monotonic()
        b.close()
        with pytest.raises(TransportClosed):
            waiter.result(timeout=5)
        assert time.monotonic() - start < 2.0
    b.close()  # idempotent
    with pytest.raises(TransportClosed):
        b.send("a", "t", [torch.ones(1)], timeout_s=1)
    with pytest.raises(TransportClosed):
        b.recv("a", "hello", timeout_s=1)


def test_messages_sent_before_the_sender_closed_stay_receivable(open_endpoint: Open) -> None:
    a, b = open_endpoint("a"), open_endpoint("b")
    sent = [torch.randn(512, 1024), torch.arange(4)]
    a.send("b", "last-words", sent, timeout_s=10)
    a.close()
    assert_same(b.recv("a", "last-words", timeout_s=10), sent)
    start = time.monotonic()
    with pytest.raises(PeerGone):
        b.recv("a", "more", timeout_s=10)  # a was seen, now it is gone: no full timeout
    assert time.monotonic() - start < 3.0


def test_a_second_endpoint_with_a_live_rank_is_refused(open_endpoint: Open) -> None:
    open_endpoint("a")
    with pytest.raises(RankInUse):
        open_endpoint("a")


@pytest.mark.parametrize("kind", ["shm", "redis"])  # cross-process: not the in-memory fake
def test_two_processes_exchange_tensors_and_a_killed_peer_raises_instead_of_hanging(
    kind: str,
    open_endpoint: Open,
    spawn_echo_peer: Callable[[], Any],
    leftovers: Callable[[], list[str]],
    remove_dead: Callable[[], None],
) -> None:
    child = spawn_echo_peer()
    assert child.next_line(timeout_s=60) == "ready"
    me = open_endpoint("parent")
    sent = [sample(dtype, (3, 5), seed=i) for i, dtype in enumerate(DTYPES)]
    sent += [torch.empty(0, 4), torch.arange(16 << 20, dtype=torch.int32)]  # 64 MiB
    me.send("child", "ping", sent, timeout_s=30)
    assert_same(me.recv("child", "pong", timeout_s=30), sent)
    assert child.next_line(timeout_s=30) == "echoed"

    child.kill()
    start = time.monotonic()
    with pytest.raises(PeerGone):
        me.recv("child", "never-sent", timeout_s=20)
    assert time.monotonic() - start < 5.0  # within the liveness TTL, not the 20 s timeout
    with pytest.raises(PeerGone):
        me.send("child", "too-late", [torch.ones(100_000)], timeout_s=5)
    me.close()
    remove_dead()
    assert leftovers() == []
