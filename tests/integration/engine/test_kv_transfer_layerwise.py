"""The layer-wise KV transfer (moeflow/engine/kv_transfer.py) between two real engines.

A prefill and a decode engine (tiny llama, float32) in this process, joined by a real XCCL
backend: the prefill's engine thread sends each layer from its blocks, a receiver thread on the
decode side writes each layer into the reserved blocks as it arrives, as the servers do. Greedy
tokens equal transformers'. A prefill process killed with SIGKILL mid-transfer, and a decode
request aborted mid-transfer, end the transfer cleanly: a clear error, no write into freed
blocks, and every segment back to its owner.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moeflow.domain.messages import GenerateRequest, KVSource, SamplingParams
from moeflow.domain.roles import Role
from moeflow.engine.disagg import kv_tag, prefill_only
from moeflow.engine.kv_transfer import KVLanding, LayerReceiver, LayerwiseKVSender
from moeflow.engine.llm_engine import LLMEngine
from moeflow.text.tokenizer import TextTokenizer
from moeflow.xccl import PeerGone, ShmConfig, Transport, make_transport
from moeflow.xccl.memory import MemoryHub
from moeflow.xccl.shm import ShmTransport
from moeflow.xccl.shm_names import parse_name, remove_stale
from tests.reference import hf_greedy, make_engine

pytestmark = pytest.mark.timeout(120)

SHM_DIR = Path("/dev/shm")
BLOCK = 4
TEXT = ("Once upon a time there was a small town by a river, and every morning the baker "
        "opened his shop before the sun came up. ")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture
def group() -> str:
    return f"kvt-{uuid.uuid4().hex[:10]}"


def _files_of(group: str) -> list[str]:
    return sorted(p.name for p in SHM_DIR.iterdir() if (parse_name(p.name) or ("",))[0] == group)


@pytest.fixture(params=["shm", "memory"])
def endpoints(request: pytest.FixtureRequest, group: str) -> Iterator[tuple[Transport, Transport]]:
    hub = MemoryHub()
    # no inline datagrams: every layer of the tiny model goes through a segment of the ring
    kwargs: dict[str, object] = ({"memory_hub": hub} if request.param == "memory"
                                 else {"shm_config": ShmConfig(inline_max_bytes=0)})
    p = make_transport(request.param, group, "prefill-0", **kwargs)  # type: ignore[arg-type]
    d = make_transport(request.param, group, "decode-0", **kwargs)  # type: ignore[arg-type]
    yield p, d
    p.close()
    d.close()
    assert _files_of(group) == []


def _pull(prefill: LLMEngine, p: Transport, d: Transport, request: GenerateRequest,
          landing: KVLanding, min_message_bytes: int
          ) -> tuple[int, LayerReceiver, LayerwiseKVSender]:
    """What /v1/prefill and KVPuller.pull do: listen, prefill with a sender, drain."""
    tag = kv_tag(request.request_id)
    receiver = LayerReceiver(d, "prefill-0", tag, landing, timeout_s=30)
    thread = threading.Thread(target=receiver.run)
    thread.start()
    sender = LayerwiseKVSender(p, "decode-0", tag, min_message_bytes=min_message_bytes)
    prefill.add_request(prefill_only(request), exports_kv=sender)
    first = -1
    while prefill.has_work:
        for chunk in prefill.step():
            first = chunk.token_ids[0]
    receiver.sender_finished()
    thread.join(timeout=30)
    return first, receiver, sender


@pytest.mark.parametrize("min_message_bytes", [1, 1 << 20], ids=["per-layer", "grouped"])
def test_layerwise_split_greedy_tokens_equal_transformers(
    model_dir: Path, endpoints: tuple[Transport, Transport], min_message_bytes: int
) -> None:
    p, d = endpoints
    # chunks of 64 tokens: the long prompt's last chunk sends every layer of all its chunks
    prefill = make_engine(model_dir, block_size=BLOCK, role=Role.PREFILL,
                          max_num_batched_tokens=64)
    decode = make_engine(model_dir, block_size=BLOCK, role=Role.DECODE)
    tokenizer = TextTokenizer.from_dir(model_dir)
    prompts = [tokenizer.encode(TEXT * k) for k in (1, 6)]
    assert len(prompts[1]) > 2 * 64
    source = KVSource(prefill_url="http://prefill.invalid", prefill_rank="prefill-0")
    sampling = SamplingParams(max_tokens=12, temperature=0.0)
    requests = {f"r-{i}": GenerateRequest(request_id=f"r-{i}", prompt_token_ids=tuple(ids),
                                          sampling=sampling, kv_source=source)
                for i, ids in enumerate(prompts)}
    for request in requests.values():
        decode.add_request(request)
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    for _ in range(500):
        if not decode.has_work:
            break
        for chunk in decode.step():
            out[chunk.request_id].extend(chunk.token_ids)
        pulls = list(decode.pending_kv_pulls)
        decode.pending_kv_pulls.clear()
        for rid in pulls:
            landing = decode.kv_landings[rid]
            first, receiver, sender = _pull(prefill, p, d, requests[rid], landing,
                                            min_message_bytes)
            assert receiver.error is None and sender.error is None
            assert landing.is_complete and receiver.span_ms > 0
            assert sender.num_bytes == (prefill.arch.num_layers * 2 * len(prompts[int(rid[2:])])
                                        * prefill.arch.num_kv_heads * prefill.arch.head_dim * 4)
            attached = decode.attach_kv(rid, None, first)
            assert attached is not None
            out[rid].extend(attached.token_ids)
    assert not decode.has_work
    assert prefill.block_manager.num_free_blocks == prefill.block_manager.num_blocks
    for rid, ids in zip(requests, prompts, strict=True):
        assert out[rid] == hf_greedy(model_dir, ids, 12)


def test_a_decode_request_aborted_mid_transfer_writes_nothing_more_and_frees_every_segment(
    model_dir: Path, group: str
) -> None:
    config = ShmConfig(close_linger_s=0.5, inline_max_bytes=0)
    with ShmTransport(group, "prefill-0", config) as p, ShmTransport(group, "decode-0") as d:
        decode = make_engine(model_dir, block_size=BLOCK, role=Role.DECODE)
        layers, heads, dim = decode.arch.num_layers, decode.arch.num_kv_heads, decode.arch.head_dim
        request = GenerateRequest(
            request_id="gone", prompt_token_ids=tuple(range(10, 90)),
            sampling=SamplingParams(max_tokens=4, temperature=0.0),
            kv_source=KVSource(prefill_url="http://prefill.invalid", prefill_rank="prefill-0"))
        decode.add_request(request)
        decode.step()
        landing = decode.kv_landings["gone"]
        receiver = LayerReceiver(d, "prefill-0", "kv/gone", landing, timeout_s=30)
        layer = torch.full((1, 2, 80, heads, dim), 3.0)
        p.send("decode-0", "kv/gone", [layer], timeout_s=5)
        thread = threading.Thread(target=receiver.run)
        thread.start()
        for _ in range(1000):
            if landing.num_layers_written or receiver.error:
                break
            thread.join(timeout=0.01)
        assert landing.num_layers_written == 1, receiver.error
        decode.abort("gone")  # the client went away: the blocks are freed now
        cache_before = decode.runner.kv_cache.clone()
        for _ in range(layers - 1):
            p.send("decode-0", "kv/gone", [layer * 2], timeout_s=5)
        receiver.sender_finished()
        thread.join(timeout=30)
        assert "ended while its KV was arriving" in str(receiver.error)
        assert torch.equal(decode.runner.kv_cache, cache_before)  # freed blocks untouched
        segments = p._pool.segments()
        assert segments and all(s.state[0] == 0 for s in segments)  # every one came back


_KILLED_SENDER = """
import sys, time, torch
from moeflow.xccl import ShmConfig
from moeflow.xccl.shm import ShmTransport
from moeflow.engine.kv_transfer import LayerwiseKVSender
group, layers, heads, dim = sys.argv[1], *map(int, sys.argv[2:5])
p = ShmTransport(group, "prefill-0", ShmConfig(inline_max_bytes=0))
cache = torch.ones(layers, 2, 64, heads, dim)
slots = torch.arange(40)
half = LayerwiseKVSender(p, "decode-0", "kv/r", min_message_bytes=1)
half.export(cache[: layers // 2], slots)  # the first half of the layers, then it dies
print("sent", half.error, flush=True)
time.sleep(600)
"""


def test_a_prefill_killed_mid_transfer_fails_the_pull_clearly_and_leaves_nothing(
    model_dir: Path, group: str
) -> None:
    decode = make_engine(model_dir, block_size=BLOCK, role=Role.DECODE)
    arch = decode.arch
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SENDER, group, str(arch.num_layers),
         str(arch.num_kv_heads), str(arch.head_dim)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        with ShmTransport(group, "decode-0", ShmConfig(liveness_interval_s=0.05)) as d:
            request = GenerateRequest(
                request_id="r", prompt_token_ids=tuple(range(10, 50)),
                sampling=SamplingParams(max_tokens=4, temperature=0.0),
                kv_source=KVSource(prefill_url="http://prefill.invalid", prefill_rank="prefill-0"))
            decode.add_request(request)
            decode.step()
            landing = decode.kv_landings["r"]
            receiver = LayerReceiver(d, "prefill-0", "kv/r", landing, timeout_s=30)
            thread = threading.Thread(target=receiver.run)
            thread.start()
            assert child.stdout is not None and child.stdout.readline().strip() == "sent None"
            child.kill()  # SIGKILL between two layers
            child.wait()
            thread.join(timeout=30)
            assert isinstance(receiver.error, PeerGone)
            assert landing.num_layers_written == arch.num_layers // 2
            decode.abort("r")
            assert decode.block_manager.num_free_blocks == decode.block_manager.num_blocks
    finally:
        child.kill()
        child.wait()
    remove_stale(SHM_DIR, group)  # what the killed process left: its socket and segments
    assert _files_of(group) == []
