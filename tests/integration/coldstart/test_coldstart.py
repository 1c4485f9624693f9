"""Cold-start paths, as real processes over real HTTP: every instance must serve the same greedy
tokens as an engine loaded from the checkpoint folder, and report its five-step record."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.platform_process import free_port
from tests.reference import make_engine, run_engine

PROMPT = [1, 5, 9, 14, 3, 27, 8]
NUM_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[int]:
    outputs, _ = run_engine(make_engine(model_dir), [PROMPT], NUM_TOKENS)
    return outputs[0]


@pytest.fixture(scope="module")
def store_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moeflow.coldstart.snapshot import store_key, write_snapshot
    from moeflow.coldstart.store import ModelStore

    root = tmp_path_factory.mktemp("store")
    ModelStore(root, budget_bytes=1 << 30).publish(
        store_key(model_dir.name, "float32"),
        lambda dest: write_snapshot(model_dir, dest, dtype="float32"))
    return root


def settings_json(model_dir: Path, port: int, **extra: Any) -> dict[str, Any]:
    from moeflow.engine.config import EngineSettings

    settings = EngineSettings(model_path=model_dir, port=port, num_threads=1,
                              kv_cache_bytes=16 << 20, max_model_len=512, **extra)
    return settings.model_dump(mode="json")


def wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def greedy(url: str) -> list[int]:
    body = {"request_id": f"t{time.monotonic_ns()}", "prompt_token_ids": PROMPT,
            "sampling": {"max_tokens": NUM_TOKENS, "temperature": 0.0}}
    response = httpx.post(f"{url}/v1/generate", json=body, timeout=30)
    response.raise_for_status()
    return [t for line in response.text.splitlines() for t in json.loads(line)["token_ids"]]


def cold_start_of(url: str) -> dict[str, Any]:
    record: dict[str, Any] = httpx.get(f"{url}/v1/coldstart", timeout=5).json()
    for step in ("preload", "weight_load", "post_load", "first_token"):
        assert record[f"{step}_seconds"] >= 0, (step, record)
    assert len(record["task_status"]) == 4
    return record


@pytest.fixture
def engine_process(model_dir: Path, store_dir: Path) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "moeflow.cli", "engine", "--model", str(model_dir),
            "--port", str(port), "--num-threads", "1", "--kv-cache-mb", "16",
            "--max-model-len", "512", "--model-store", str(store_dir)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def test_engine_loaded_from_the_store_matches_the_checkpoint(
        engine_process: str, expected: list[int]) -> None:
    assert greedy(engine_process) == expected
    record = cold_start_of(engine_process)
    assert (record["path"], record["weights_source"]) == ("cold", "store")
    metrics = httpx.get(f"{engine_process}/metrics", timeout=5).text
    for step in ("preload", "weight_load", "post_load", "first_token"):
        assert f"moeflow_coldstart_{step}_seconds_count 1.0" in metrics


def test_a_claimed_warm_pool_worker_serves_correctly(model_dir: Path,
                                                    expected: list[int]) -> None:
    from moeflow.coldstart.warm_pool import WarmPool

    pool = WarmPool(1, refill=False).start()
    try:
        instance = pool.claim(settings_json(model_dir, free_port()))
        wait_healthy(instance.url)
        assert greedy(instance.url) == expected
        record = cold_start_of(instance.url)
        assert (record["path"], record["weights_source"]) == ("warm_pool", "checkpoint")
        assert record["preload_seconds"] < 1.0  # the imports were done before the claim
    finally:
        pool.close()


def test_forked_children_serve_and_weights_broadcast_into_a_warm_worker(
        model_dir: Path, store_dir: Path, expected: list[int]) -> None:
    from moeflow.coldstart.fork import ForkServer
    from moeflow.coldstart.warm_pool import WarmPool

    server = ForkServer(settings_json(model_dir, 0, model_store=str(store_dir))).start()
    pool = WarmPool(1, refill=False).start()
    try:
        children = [server.fork(free_port()) for _ in range(2)]
        for child in children:
            # the child says when it listens; it ran no warm-up of its own (the parent did),
            # so this first request is its first forward pass
            ready = child.wait_ready()
            assert ready["is_ready"] and ready["path"] == "fork"
            assert 0 <= ready["to_ready_seconds"] < 30
            assert greedy(child.url) == expected
            record = cold_start_of(child.url)
            assert (record["path"], record["weights_source"]) == ("fork", "fork")
            assert record["to_ready_seconds"] == ready["to_ready_seconds"]
            stats = httpx.get(f"{child.url}/v1/stats", timeout=5).json()
            assert stats["instance_id"] == f"fork-{child.url.rsplit(':', 1)[1]}"
        late = server.fork(free_port())  # after the others served: the template is unchanged
        late.wait_ready()
        assert greedy(late.url) == expected
        group = f"cs{time.monotonic_ns() % 10**8}"
        weights = {"transport": "shm", "group": group, "rank": "warm-0", "peer": "src",
                   "tag": "weights"}
        instance = pool.claim(settings_json(model_dir, free_port()), weights=weights)
        server.broadcast(group, "src", ["warm-0"], "weights")
        wait_healthy(instance.url)
        assert greedy(instance.url) == expected
        assert cold_start_of(instance.url)["weights_source"] == "xccl"
        for child in [*children, late]:
            child.stop()
    finally:
        pool.close()
        server.close()


def test_prefault_keeps_store_mapped_weights_bit_identical(store_dir: Path,
                                                           model_dir: Path) -> None:
    import torch

    from moeflow.coldstart.fork import prefault
    from moeflow.coldstart.snapshot import pack, read_snapshot, store_key
    from moeflow.coldstart.store import ModelStore
    from moeflow.engine.models.arch import load_arch

    entry = ModelStore(store_dir).get(store_key(model_dir.name, "float32"))
    assert entry is not None
    model = read_snapshot(entry.path, load_arch(entry.path), max_len=512)
    before = [t.clone() for t in pack(model)[1:]]
    assert prefault(model) > 0
    after = pack(model)[1:]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    # the snapshot file itself is untouched (private mapping)
    again = read_snapshot(entry.path, load_arch(entry.path), max_len=512)
    assert all(torch.equal(x, y) for x, y in zip(before, pack(again)[1:], strict=True))
