"""XCCL throughput: send->recv GB/s per backend between two processes, against a plain memcpy.

Usage: .venv/bin/python -P benchmarks/xccl.py [--sizes-mib 1,16,64] [--rounds 5]
(-P keeps benchmarks/ off sys.path, where a module named like a stdlib one would shadow it.)

The parent process sends, a spawned child receives. Per (round, case, size) the child is told
what to expect, the parent stamps t0 and sends `num_messages` messages of one uint8 tensor
back to back, and the child stamps t1 after its last `recv` returned (perf_counter is
CLOCK_MONOTONIC, shared by both processes); GB/s = bytes / (t1 - t0). Each timed trial follows an
untimed warm-up of the same shape (so shm segments and Redis allocations are warm, as in a
steady KV stream). The child drops the received views at once and checks first and last byte.
The memcpy baseline is `dst.copy_(src)` of the same bytes, same count, in the parent. Cases run
interleaved (memcpy, shm, redis, memcpy, ...) so drift hits all of them; we report medians and
ranges, and ratios as the median of per-round ratios. torch uses 1 thread everywhere.
Starts its own redis-server on a free loopback TCP port.

The `kv-*` cases are the platform's prefill -> decode KV path at the same sizes, between paged KV
caches shaped like SmolLM2-135M's (30 layers, 3 KV heads x 64, float32, 16-token blocks, the
prompt's blocks scattered over a cache twice its size) on both sides:
- `kv-layerwise` (moeflow/engine/kv_transfer.py, what the platform runs): the parent gathers each
  layer from its blocks straight into a pooled shm segment (`LayerwiseKVSender`), the child
  copies each layer from the mapped segment into its blocks as it arrives (`LayerReceiver`);
- `kv-whole` (the path before it): gather the whole prompt's KV, send it, receive, clone, and
  scatter it into the blocks, one after the other.
t1 is when the child's last block write returned, so these include both copies; "x memcpy" is
against one `copy_` of the same bytes. Last line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from moeflow.engine.kv_transfer import (
    MIN_MESSAGE_BYTES,
    KVLanding,
    LayerReceiver,
    LayerwiseKVSender,
)
from moeflow.xccl import RedisConfig, Transport, make_transport
from moeflow.xccl.redis_server import start_local_redis

SHM_TARGET_RATIO = 0.7
REDIS_TARGET_GBPS = 0.7
TIMEOUT_S = 60.0
KV_LAYERS, KV_HEADS, KV_HEAD_DIM, KV_BLOCK = 30, 3, 64, 16  # SmolLM2-135M, float32
KV_CASES = ("kv-whole", "kv-layerwise")
KV_MIN_MESSAGE_BYTES = [MIN_MESSAGE_BYTES]  # --kv-min-message-mib (the sender is the parent)


def _kv_tokens(size_bytes: int) -> int:
    return max(1, size_bytes // (KV_LAYERS * 2 * KV_HEADS * KV_HEAD_DIM * 4))


def _kv_cache_and_slots(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A paged cache with room for twice the prompt, and the prompt's slots in shuffled blocks."""
    num_blocks = 2 * -(-num_tokens // KV_BLOCK)
    cache = torch.zeros(KV_LAYERS, 2, num_blocks * KV_BLOCK, KV_HEADS, KV_HEAD_DIM)
    blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(num_tokens)
    return cache, blocks[positions // KV_BLOCK] * KV_BLOCK + positions % KV_BLOCK


_RECEIVER_CACHES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _kv_receive(endpoint: Transport, kind: str, tag: str, num_messages: int, fill: int,
                size: int) -> bool:
    """The decode side of `num_messages` KV transfers; True when the blocks hold `fill`."""
    num_tokens = _kv_tokens(size)
    if size not in _RECEIVER_CACHES:  # the warm-up trial allocates (and faults in) the cache
        _RECEIVER_CACHES[size] = _kv_cache_and_slots(num_tokens, seed=1)
    cache, slots = _RECEIVER_CACHES[size]
    for i in range(num_messages):
        if kind == "kv-layerwise":
            landing = KVLanding(cache, slots, 0, num_tokens)
            receiver = LayerReceiver(endpoint, "tx", f"{tag}/{i}", landing, TIMEOUT_S)
            receiver.run()
            if receiver.error is not None:
                raise receiver.error
        else:
            (kv,) = endpoint.recv("tx", f"{tag}/{i}", TIMEOUT_S)
            kv = kv.clone()  # the old KVPuller kept a private copy, then wrote the blocks
            cache[:, :, slots] = kv
            del kv
    return all(int(cache[layer, 1, slots[-1], -1, -1]) == fill for layer in (0, KV_LAYERS - 1))


def _num_messages(size_bytes: int) -> int:
    return max(4, min(32, (128 << 20) // size_bytes))


def _endpoints(group: str, rank: str, redis_url: str, chunk_mib: float) -> dict[str, Transport]:
    config = RedisConfig(url=redis_url, chunk_num_bytes=int(chunk_mib * (1 << 20)))
    return {
        "shm": make_transport("shm", group, rank),
        "redis": make_transport("redis", group, rank, redis_config=config),
    }


def _receiver(conn: Connection, group: str, redis_url: str, chunk_mib: float) -> None:
    torch.set_num_threads(1)
    endpoints = _endpoints(group, "rx", redis_url, chunk_mib)
    conn.send("ready")
    while (command := conn.recv()) != "stop":
        kind, tag, num_messages, fill, size = command
        if kind in KV_CASES:
            ok = _kv_receive(endpoints["shm"], kind, tag, num_messages, fill, size)
            conn.send((time.perf_counter(), ok))
            continue
        ok = True
        for _ in range(num_messages):
            (tensor,) = endpoints[kind].recv("tx", tag, TIMEOUT_S)
            ok = ok and int(tensor[0]) == fill and int(tensor[-1]) == fill
            del tensor  # hand the shm segment back to the sender right away
        conn.send((time.perf_counter(), ok))
    for endpoint in endpoints.values():
        endpoint.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _memcpy_gbps(src: torch.Tensor, dst: torch.Tensor, num_messages: int) -> float:
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(num_messages):
        dst.copy_(src)
    return src.numel() * num_messages / (time.perf_counter() - t0) / 1e9


def _transfer_gbps(
    endpoint: Transport,
    conn: Connection,
    kind: str,
    src: torch.Tensor,
    num_messages: int,
    fill: int,
) -> float:
    for timed in (False, True):
        tag = f"{kind}/{src.numel()}/{fill}/{timed}"
        conn.send((kind, tag, num_messages, fill, src.numel()))
        if kind in KV_CASES:
            num_bytes, t0 = _kv_send(endpoint, kind, tag, num_messages, fill, src.numel())
        else:
            num_bytes, t0 = src.numel(), time.perf_counter()
            for _ in range(num_messages):
                endpoint.send("rx", tag, [src], TIMEOUT_S)
        t1, ok = conn.recv()
        if not ok:
            raise RuntimeError(f"{kind}: received bytes differ from what was sent")
    return float(num_bytes * num_messages / (t1 - t0) / 1e9)


def _kv_send(endpoint: Transport, kind: str, tag: str, num_messages: int, fill: int,
             size: int) -> tuple[int, float]:
    """The prefill side of `num_messages` KV transfers; (bytes per transfer, t0)."""
    cache, slots = _kv_cache_and_slots(_kv_tokens(size), seed=0)
    cache.fill_(fill)
    num_bytes = cache[:, :, slots].numel() * 4
    t0 = time.perf_counter()
    for i in range(num_messages):
        if kind == "kv-layerwise":
            sender = LayerwiseKVSender(endpoint, "rx", f"{tag}/{i}", TIMEOUT_S,
                                       min_message_bytes=KV_MIN_MESSAGE_BYTES[0])
            sender.export(cache, slots)
            if sender.error is not None:
                raise sender.error
        else:
            endpoint.send("rx", f"{tag}/{i}", [cache[:, :, slots]], TIMEOUT_S)
    return num_bytes, t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis-chunk-mib", type=float, default=4.0)
    parser.add_argument("--kv-min-message-mib", type=float, default=MIN_MESSAGE_BYTES / (1 << 20),
                        help="kv-layerwise: consecutive layers share a message up to this size")
    parser.add_argument("--cases", default="memcpy,shm,redis,kv-whole,kv-layerwise",
                        help="comma-separated; memcpy always runs (the ratios need it)")
    args = parser.parse_args()
    KV_MIN_MESSAGE_BYTES[0] = int(args.kv_min_message_mib * (1 << 20))
    sizes_mib = [int(s) for s in args.sizes_mib.split(",")]
    load_start = os.getloadavg()[0]
    torch.set_num_threads(1)
    group = f"bench-{os.getpid()}"
    cases = ("memcpy", *(c for c in args.cases.split(",") if c and c != "memcpy"))
    gbps: dict[str, dict[int, list[float]]] = {c: {s: [] for s in sizes_mib} for c in cases}
    with tempfile.TemporaryDirectory(prefix="xccl-bench-") as tmp:
        server = start_local_redis(Path(tmp), port=_free_port())
        ctx = mp.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        args_ = (child_conn, group, server.url, args.redis_chunk_mib)
        child = ctx.Process(target=_receiver, args=args_, daemon=True)
        child.start()
        endpoints = _endpoints(group, "tx", server.url, args.redis_chunk_mib)
        try:
            assert conn.recv() == "ready"
            for round_index in range(args.rounds):
                for case in cases:
                    for size in sizes_mib:
                        fill = (round_index * 7 + size) % 251
                        src = torch.full((size << 20,), fill, dtype=torch.uint8)
                        count = _num_messages(src.numel())
                        if case == "memcpy":
                            value = _memcpy_gbps(src, torch.empty_like(src), count)
                        else:
                            endpoint = endpoints["shm" if case in KV_CASES else case]
                            value = _transfer_gbps(endpoint, conn, case, src, count, fill)
                        gbps[case][size].append(value)
                print(
                    f"round {round_index + 1}/{args.rounds}: "
                    + "  ".join(
                        f"{c} " + "/".join(f"{gbps[c][s][-1]:.2f}" for s in sizes_mib)
                        for c in cases
                    ),
                    flush=True,
                )
            conn.send("stop")
            child.join(timeout=30)
        finally:
            for endpoint in endpoints.values():
                endpoint.close()
            if child.is_alive():
                child.kill()
            server.stop()
    _report(gbps, sizes_mib, args.rounds, args.redis_chunk_mib, load_start)
    print(f"kv-layerwise messages of at least {args.kv_min_message_mib} MiB")


def _report(
    gbps: dict[str, dict[int, list[float]]],
    sizes_mib: list[int],
    rounds: int,
    chunk_mib: float,
    load_start: float,
) -> None:
    print(f"\n{'size':>6} {'case':>12} {'median GB/s':>12} {'range':>16} {'x memcpy':>9}")
    result: dict[str, object] = {
        "host": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, 1 thread",
        # Other processes on the host skew everything here: record how busy it was.
        "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "rounds": rounds,
        "redis_chunk_mib": chunk_mib,
        "targets": {"shm_over_memcpy": SHM_TARGET_RATIO, "redis_gbps": REDIS_TARGET_GBPS},
    }
    ratios: dict[str, dict[int, float]] = {c: {} for c in gbps if c != "memcpy"}
    for size in sizes_mib:
        for case, case_ratios in ratios.items():
            per_round = [
                s / m for s, m in zip(gbps[case][size], gbps["memcpy"][size], strict=True)
            ]
            case_ratios[size] = statistics.median(per_round)
        for case, values in gbps.items():
            ratio = statistics.median(values[size]) / statistics.median(gbps["memcpy"][size])
            print(
                f"{size:>4}Mi {case:>12} {statistics.median(values[size]):>12.2f} "
                f"{min(values[size]):>7.2f}-{max(values[size]):<8.2f} {ratio:>9.2f}"
            )
    for case, values in gbps.items():
        result[f"{case}_gbps"] = {
            str(s): {
                "median": round(statistics.median(v), 3),
                "min": round(min(v), 3),
                "max": round(max(v), 3),
            }
            for s, v in values.items()
        }
    for case, case_ratios in ratios.items():
        result[f"{case}_over_memcpy".replace("-", "_")] = {
            str(s): round(r, 3) for s, r in case_ratios.items()
        }
    for case in ("shm", "kv-layerwise"):
        if case in ratios:
            result[f"{case}_meets_target".replace("-", "_")] = all(
                r >= SHM_TARGET_RATIO for r in ratios[case].values()
            )
    if "redis" in gbps:
        result["redis_meets_target"] = all(
            statistics.median(gbps["redis"][s]) >= REDIS_TARGET_GBPS for s in sizes_mib if s >= 16
        )
    print("RESULT " + json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
