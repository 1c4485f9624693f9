"""Attention/expert disaggregation through `moeflow up --mode ae`: real processes, both XCCL
backends, the balancer over HTTP, and an expert instance killed mid-serving."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from moeflow.domain.messages import AttentionExpertStats, ExpertInstanceStats
from moeflow.engine.ae.balancer import ExpertBalancer
from moeflow.text.tokenizer import TextTokenizer
from tests.platform_process import Platform, start_platform
from tests.reference import hf_greedy

MODEL = "tiny-moe"
# Tests that start a platform of their own serve under other names: the XCCL group is the
# served name, and the module fixture's last platform (shm) still holds MODEL's ranks then.
OWN_MODEL = "tiny-moe-own"


def _role_processes(platform: Platform, role: str) -> list[tuple[int, str]]:
    """(pid, url) of the platform's engines of `role`, by rank."""
    out = subprocess.run(["pgrep", "-a", "-P", str(platform.process.pid), "-f", f"role {role}"],
                         capture_output=True, text=True, check=False).stdout
    found = []
    for line in out.splitlines():
        argv = line.split()
        rank = int(argv[argv.index("--rank") + 1])
        found.append((rank, int(argv[0]), f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"))
    return [(pid, url) for _, pid, url in sorted(found)]


def _prompts(model_dir: Path, n: int) -> list[list[int]]:
    tokenizer = TextTokenizer.from_dir(model_dir)
    base = "The river ran past the mill and the old baker counted his loaves "
    return [tokenizer.encode(base * (1 + i % 3) + f" number {i}") for i in range(n)]


async def _complete(platform: Platform, prompts: list[list[int]], max_tokens: int,
                    model: str = MODEL) -> list[str]:
    c = openai.AsyncOpenAI(base_url=platform.base_url, api_key="x", max_retries=0, timeout=60)
    try:
        results = await asyncio.gather(*(
            c.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0)
            for p in prompts
        ))
    finally:
        await c.close()
    return [r.choices[0].text for r in results]


def _expected(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[str]:
    tokenizer = TextTokenizer.from_dir(model_dir)
    return [tokenizer.decode(hf_greedy(model_dir, p, max_tokens)) for p in prompts]


@pytest.fixture(scope="module", params=[("qwen3_moe", "shm"), ("qwen3_moe", "redis"),
                                        ("mixtral", "shm"), ("mixtral", "redis"),
                                        ("qwen3_moe", "shm-ring")],
                ids=lambda p: "-".join(p))
def ae_platform(request: pytest.FixtureRequest,
                tiny_dirs: dict[str, Path]) -> Iterator[tuple[Platform, Path]]:
    arch, transport = request.param
    ring = ["--ae-spin-us", "200"] if transport == "shm-ring" else []  # polled shm rings
    platform = start_platform(tiny_dirs[arch], [
        "--served-model-name", MODEL, "--mode", "ae", "--attention", "1", "--experts", "2",
        "--transport", transport.removesuffix("-ring"), "--rebalance-interval-s", "0",
        "--max-model-len", "512", *ring,
        "--micro-batch-min-tokens", "1",  # two micro-batches in decode steps too
    ])
    yield platform, tiny_dirs[arch]
    assert platform.stop() == 0, platform.log()[-3000:]


async def test_split_equals_transformers_before_and_after_a_live_rebalance(
    ae_platform: tuple[Platform, Path],
) -> None:
    platform, model_dir = ae_platform
    prompts = _prompts(model_dir, 8)
    expected = _expected(model_dir, prompts, 12)
    assert await _complete(platform, prompts, 12) == expected
    [(_, attention_url)] = _role_processes(platform, "attention")
    experts = _role_processes(platform, "expert")
    headers = platform.engine_headers()  # moeflow up's engines take its internal token only
    balancer = ExpertBalancer([attention_url], [url for _, url in experts], 8, budget=4,
                              internal_token=headers["x-moeflow-internal-token"])
    try:
        # rebalance while requests are in flight: no pause, no change in outputs
        during = asyncio.create_task(_complete(platform, prompts, 12))
        report = await asyncio.to_thread(balancer.rebalance, force=True)
        assert report.applied and report.version >= 1
        assert await during == expected
    finally:
        balancer.close()
    assert sum(len(h) for h in report.hosted) == 12  # 8 experts + a budget of 4 replicas
    assert await _complete(platform, prompts, 12) == expected
    stats = AttentionExpertStats.model_validate_json(
        httpx.get(f"{attention_url}/v1/experts/stats", headers=headers).content)
    assert stats.placement.version == report.version
    assert stats.placement.hosted == report.hosted
    assert all(p > 0 for p in stats.pairs_per_instance)
    hosted = [ExpertInstanceStats.model_validate_json(
        httpx.get(f"{url}/v1/experts/stats", headers=headers).content).hosted
        for _, url in experts]
    assert tuple(hosted) == report.hosted  # break after make: unplaced replicas dropped
    metrics = httpx.get(f"{attention_url}/metrics").text
    assert "moeflow_expert_imbalance_ratio" in metrics
    assert 'moeflow_expert_exchange_seconds{engine="attention-0",layer="0",leg="a2e"}' in metrics


@pytest.mark.parametrize("spin_us", [0, 200], ids=["datagrams", "rings"])
async def test_killed_expert_instance_fails_clearly_then_heals(
    tiny_dirs: dict[str, Path], spin_us: int
) -> None:
    model_dir = tiny_dirs["qwen3_moe"]
    platform = start_platform(model_dir, [
        "--served-model-name", OWN_MODEL, "--mode", "ae", "--attention", "1", "--experts", "2",
        "--transport", "shm", "--rebalance-interval-s", "1", "--expert-timeout-s", "10",
        "--ae-spin-us", str(spin_us),
    ])
    try:
        prompts = _prompts(model_dir, 4)
        expected = _expected(model_dir, prompts, 160)
        [(victim, _)] = _role_processes(platform, "expert")[1:]
        running = asyncio.gather(*(_complete(platform, [p], 160, OWN_MODEL) for p in prompts),
                                 return_exceptions=True)
        await asyncio.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        outcomes = await asyncio.wait_for(running, timeout=60)  # nothing hangs
        for outcome, want in zip(outcomes, expected, strict=True):
            if isinstance(outcome, BaseException):  # failed clearly, with the OpenAI envelope
                assert isinstance(outcome, openai.APIStatusError), outcome
                assert outcome.status_code == 503
                assert "no live expert instance" in outcome.message
            else:
                assert outcome == [want]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the balancer re-places the orphaned experts
            try:
                assert await _complete(platform, prompts, 160, OWN_MODEL) == expected
                break
            except openai.APIError:
                await asyncio.sleep(0.5)
        else:
            pytest.fail(f"never healed:\n{platform.log()[-3000:]}")
        assert "re-placed the experts of dead instances" in platform.log()
    finally:
        assert platform.stop() == 0, platform.log()[-3000:]


@pytest.mark.slow
def test_upcycled_smollm2_chat_through_the_split(
    upcycled_smollm2_dir: Path, smollm2_dir: Path
) -> None:
    """A real checkpoint through the split, over shm (the Redis transport carries the same
    exchange in the tiny-model tests above, before and after a live rebalance)."""
    from tests.reference import hf_chat_ids

    platform = start_platform(upcycled_smollm2_dir, [
        "--served-model-name", OWN_MODEL, "--mode", "ae", "--attention", "1", "--experts", "2",
        "--transport", "shm", "--rebalance-interval-s", "0", "--max-model-len", "1024",
    ], timeout_s=300)
    try:
        tokenizer = TextTokenizer.from_dir(smollm2_dir)
        client = openai.OpenAI(base_url=platform.base_url, api_key="x", max_retries=0,
                               timeout=120)
        for question in ("What is the capital of France?", "Name three colours."):
            messages = [{"role": "user", "content": question}]
            expected = hf_greedy(upcycled_smollm2_dir, hf_chat_ids(smollm2_dir, messages), 16)
            reply = client.chat.completions.create(model=OWN_MODEL, messages=messages,  # type: ignore[arg-type]
                                                   max_tokens=16, temperature=0)
            assert reply.choices[0].message.content == tokenizer.decode(expected)
    finally:
        assert platform.stop() == 0, platform.log()[-3000:]
