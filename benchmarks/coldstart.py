"""Cold-start benchmark: time to first token of a new instance, and 0 -> N instances ready.

Paths, interleaved round by round (each a fresh instance, stopped after it answers):
- cold:             `moeflow engine` as a new process, weights from the checkpoint folder
- cold_store:       the same, weights mapped from the node store (/dev/shm)
- warm_pool:        a claimed warm-pool worker (imports done), weights from the checkpoint
- warm_pool_store:  a claimed warm-pool worker, weights mapped from the node store
- fork:             a child of the fork server (weights shared copy-on-write)
- xccl:             a claimed warm-pool worker receiving the weights from the fork server over
                    XCCL shm (`Transport.broadcast`)
TTFT is measured by the client: from asking for the instance to the first NDJSON token line of
its first request (health polled every 1 ms over one keep-alive client, so the poll itself costs
little). Fork to ready is taken two ways: the parent's view (the fork server's client gets the
child's "ready" line, no polling: `ForkedInstance.wait_ready`) and the child's own record
(`to_ready_seconds`, claim -> sockets listening); fork to first token is the fork path's TTFT.
Scale-out: N instances asked for at once, to the last one ready: fork for N in 1, 4, 16 (ready
lines), cold processes for N in 1, 4 (health polling); on `--scale-model`.

Usage: python benchmarks/coldstart.py [--model smollm2-135m-instruct] [--rounds 3]
Last line: RESULT {json}
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from moeflow.checkpoints.store import resolve_home, resolve_model
from moeflow.coldstart.fork import ForkServer
from moeflow.coldstart.snapshot import store_key, write_snapshot
from moeflow.coldstart.store import ModelStore
from moeflow.coldstart.warm_pool import WarmPool
from moeflow.engine.config import EngineSettings

PROMPT = list(range(1, 17))
CLIENT = httpx.Client(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if CLIENT.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.001)
    raise TimeoutError(url)


def first_token(url: str) -> None:
    body = {"request_id": f"b{time.monotonic_ns()}", "prompt_token_ids": PROMPT,
            "sampling": {"max_tokens": 1, "temperature": 0.0}}
    with CLIENT.stream("POST", f"{url}/v1/generate", json=body) as response:
        for _ in response.iter_lines():
            return


def snapshot_into(model_dir: Path, dest: Path) -> dict[str, Any]:
    return write_snapshot(model_dir, dest, dtype="float32")


def settings_for(model_dir: Path, port: int, store: Path | None) -> dict[str, Any]:
    return EngineSettings(model_path=model_dir, port=port, num_threads=1,
                          kv_cache_bytes=64 << 20, model_store=store).model_dump(mode="json")


def spawn_cold(model_dir: Path, port: int, store: Path | None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "moeflow.cli", "engine", "--model", str(model_dir),
            "--port", str(port), "--num-threads", "1", "--kv-cache-mb", "64"]
    if store is not None:
        argv += ["--model-store", str(store)]
    env = {**os.environ, "MOEFLOW_LAUNCH_MONOTONIC": str(time.monotonic())}
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(30)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--scale-model", default="", help="model for 0->N (default: tiny llama)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store-dir", type=Path, default=Path("/dev/shm/moeflow-bench-store"))
    args = parser.parse_args()
    home = resolve_home(os.environ)
    model_dir = resolve_model(args.model, home)
    work = Path(tempfile.mkdtemp(prefix="moeflow-coldstart-bench-"))
    if args.scale_model:
        scale_dir = resolve_model(args.scale_model, home)
    else:
        from moeflow.checkpoints.tiny import make_tiny

        scale_dir = make_tiny("llama", work / "tiny-llama", seed=0)
    store = ModelStore(args.store_dir, budget_bytes=8 << 30)
    for d in (model_dir, scale_dir):
        started = time.monotonic()
        store.publish(store_key(d.name, "float32"),
                      functools.partial(snapshot_into, d))
        print(f"store add {d.name}: {time.monotonic() - started:.2f} s", file=sys.stderr)

    fork_server = ForkServer(settings_for(model_dir, 0, args.store_dir)).start()
    scale_server = ForkServer(settings_for(scale_dir, 0, args.store_dir)).start()
    pool = WarmPool(3 * args.rounds, refill=False).start()
    ttft: dict[str, list[float]] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    fork_ready: dict[str, list[float]] = {"parent_view": [], "child_record": []}

    def measure(name: str, launch: Callable[[int], Callable[[], None]]) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        stop = launch(port)
        if name != "fork":  # a forked child says when it is ready (see `fork` below)
            wait_healthy(url)
        first_token(url)
        ttft.setdefault(name, []).append(time.monotonic() - started)
        records.setdefault(name, []).append(CLIENT.get(f"{url}/v1/coldstart").json())
        stop()

    def cold(store_dir: Path | None) -> Callable[[int], Callable[[], None]]:
        def launch(port: int) -> Callable[[], None]:
            process = spawn_cold(model_dir, port, store_dir)
            return lambda: stop_process(process)
        return launch

    def warm(store_dir: Path | None, xccl: bool = False) -> Callable[[int], Callable[[], None]]:
        def launch(port: int) -> Callable[[], None]:
            if not xccl:
                return pool.claim(settings_for(model_dir, port, store_dir)).stop
            group, rank = f"bench{time.monotonic_ns() % 10**9}", f"warm-{port}"
            instance = pool.claim(settings_for(model_dir, port, None), weights={
                "transport": "shm", "group": group, "rank": rank, "peer": "src", "tag": "w"})
            fork_server.broadcast(group, "src", [rank], "w")
            return instance.stop
        return launch

    def fork(port: int) -> Callable[[], None]:
        started = time.monotonic()
        child = fork_server.fork(port)
        record = child.wait_ready()
        fork_ready["parent_view"].append(time.monotonic() - started)
        fork_ready["child_record"].append(record["to_ready_seconds"])
        return child.stop

    try:
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
            measure("cold", cold(None))
            measure("cold_store", cold(args.store_dir))
            measure("warm_pool", warm(None))
            measure("warm_pool_store", warm(args.store_dir))
            measure("fork", fork)
            measure("xccl", warm(None, xccl=True))
        pool.close()
        scale: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for n in (1, 4, 16):
                ports = [free_port() for _ in range(n)]
                started = time.monotonic()
                children = [scale_server.fork(p) for p in ports]
                for child in children:
                    child.wait_ready()
                scale.setdefault(f"fork_{n}", []).append(time.monotonic() - started)
                for child in children:
                    child.stop()
            for n in (1, 4):
                ports = [free_port() for _ in range(n)]
                started = time.monotonic()
                processes = [spawn_cold(scale_dir, p, None) for p in ports]
                for p in ports:
                    wait_healthy(f"http://127.0.0.1:{p}")
                scale.setdefault(f"cold_{n}", []).append(time.monotonic() - started)
                for process in processes:
                    stop_process(process)
            time.sleep(0.5)
    finally:
        pool.close()
        fork_server.close()
        scale_server.close()

    def steps(name: str) -> dict[str, float]:
        keys = ("preload_seconds", "weight_load_seconds", "post_load_seconds")
        return {k: statistics.median(x[k] for x in records[name]) for k in keys}

    result: dict[str, Any] = {
        "model": args.model, "scale_model": scale_dir.name, "rounds": args.rounds,
        "host": f"{platform.machine()}, {os.cpu_count()} cores", "threads_per_instance": 1,
        "ttft_s": {k: summary(v) for k, v in ttft.items()},
        "engine_steps_s": {k: steps(k) for k in records},
        "fork_to_ready_s": {k: summary(v) for k, v in fork_ready.items()},
        "fork_to_first_token_s": summary(ttft["fork"]),
        "zero_to_n_ready_s": {k: summary(v) for k, v in scale.items()},
    }
    def line(label: str, values: dict[str, float]) -> None:
        print(f"{label:28s} median {values['median'] * 1000:7.0f} ms  "
              f"[{values['min'] * 1000:.0f} - {values['max'] * 1000:.0f}]", file=sys.stderr)

    for name, values in result["ttft_s"].items():
        line(f"{name} TTFT", values)
    for view, values in result["fork_to_ready_s"].items():
        line(f"fork to ready ({view})", values)
    line("fork to first token", result["fork_to_first_token_s"])
    for name, values in result["zero_to_n_ready_s"].items():
        line(f"0 -> N ready {name}", values)
    out = Path(__file__).resolve().parent / "results" / "coldstart.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("RESULT " + json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
