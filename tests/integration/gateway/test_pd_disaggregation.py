"""Prefill/decode disaggregation through `moeflow up --mode pd`, over both XCCL backends.

Greedy tokens through the split equal transformers' (and so colocated serving's), and so do
those of short prompts the gateway leaves on the decode instance (computed there, no KV moves);
a decode instance out of KV memory makes prefill wait without losing anything; killing a decode
instance mid-request fails its requests clearly, frees nothing twice, and the rest serves on.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from moeflow.text.tokenizer import TextTokenizer
from tests.platform_process import ALWAYS_SPLIT, Platform, start_platform
from tests.reference import hf_greedy, make_engine, run_engine

MODEL = "tiny"


def _pd_platform(model_dir: Path, *args: str) -> Platform:
    return start_platform(
        model_dir, ["--served-model-name", MODEL, "--mode", "pd", "--max-model-len", "1024", *args]
    )


def _prompts(model_dir: Path, n: int, repeats: int = 1) -> list[list[int]]:
    """``repeats`` 1: 34-100 tokens (short, never split); 8: 270-340 tokens (split-worthy)."""
    tokenizer = TextTokenizer.from_dir(model_dir)
    base = "Once upon a time there was a small town by a river, and every morning the baker "
    return [tokenizer.encode(base * (repeats + i % 3) + f" story {i}") for i in range(n)]


def _children(platform: Platform, role: str) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(platform.process.pid), "-f", f"role {role}"],
                         capture_output=True, text=True, check=False).stdout
    return [int(pid) for pid in out.split()]


def _engine_url(platform: Platform, role: str) -> str:
    out = subprocess.run(["pgrep", "-a", "-P", str(platform.process.pid), "-f", f"role {role}"],
                         capture_output=True, text=True, check=False).stdout.split()
    return f"http://127.0.0.1:{out[out.index('--port') + 1]}"


@pytest.fixture(scope="module", params=["shm", "redis"])
def pd_platform(request: pytest.FixtureRequest, tiny_dirs: dict[str, Path]) -> Iterator[Platform]:
    p = _pd_platform(tiny_dirs["llama"], "--prefill", "1", "--decode", "2",
                     "--transport", request.param)
    yield p
    assert p.stop() == 0, p.log()[-3000:]


async def test_split_greedy_tokens_equal_transformers_and_colocated(
    pd_platform: Platform, tiny_dirs: dict[str, Path]
) -> None:
    model_dir = tiny_dirs["llama"]
    prompts = _prompts(model_dir, 8, repeats=8)
    assert min(len(p) for p in prompts) >= 256  # pd_min_prompt_tokens: worth splitting
    split_before = pd_platform.metric("moeflow_requests_by_mode_total", mode="split") or 0
    tokenizer = TextTokenizer.from_dir(model_dir)
    colocated, _ = run_engine(make_engine(model_dir), prompts, max_tokens=16)
    c = openai.AsyncOpenAI(base_url=pd_platform.base_url, api_key="x", max_retries=0)
    results = await asyncio.gather(*(
        c.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0)
        for p in prompts
    ))
    await c.close()
    for prompt, result, local in zip(prompts, results, colocated, strict=True):
        expected = hf_greedy(model_dir, prompt, 16)
        assert local == expected
        assert result.choices[0].text == tokenizer.decode(expected)
        assert result.usage is not None
        assert result.usage.completion_tokens == len(expected)
        assert result.usage.prompt_tokens == len(prompt)
    # 8 at once: the first splits; later ones may find the prefill queue long enough to be
    # computed on an idle decode instance instead (routing.split_or_local); both are exact
    split = (pd_platform.metric("moeflow_requests_by_mode_total", mode="split") or 0)
    assert split - split_before >= 1
    assert (pd_platform.metric("moeflow_kv_transfer_bytes_sum") or 0) > 0


async def test_short_prompts_are_computed_on_the_decode_instance_token_exact(
    pd_platform: Platform, tiny_dirs: dict[str, Path]
) -> None:
    model_dir = tiny_dirs["llama"]
    prompts = _prompts(model_dir, 6)
    assert max(len(p) for p in prompts) < 256
    tokenizer = TextTokenizer.from_dir(model_dir)

    def counts() -> tuple[float, float, int]:
        stats = httpx.get(f"{_engine_url(pd_platform, 'prefill')}/v1/stats",
                          headers=pd_platform.engine_headers()).json()
        return (pd_platform.metric("moeflow_requests_by_mode_total", mode="colocated") or 0,
                pd_platform.metric("moeflow_kv_transfer_bytes_count") or 0,
                stats["num_prompt_tokens_total"])

    local_before, transfers_before, prefill_tokens_before = counts()
    c = openai.AsyncOpenAI(base_url=pd_platform.base_url, api_key="x", max_retries=0)
    results = await asyncio.gather(*(
        c.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0)
        for p in prompts
    ))
    await c.close()
    for prompt, result in zip(prompts, results, strict=True):
        expected = hf_greedy(model_dir, prompt, 16)
        assert result.choices[0].text == tokenizer.decode(expected)
        assert result.usage is not None and result.usage.completion_tokens == len(expected)
    local, transfers, prefill_tokens = counts()
    assert local - local_before == len(prompts)  # not split ...
    assert transfers == transfers_before  # ... no KV moved ...
    assert prefill_tokens == prefill_tokens_before  # ... and the prefill instance computed none


def test_split_streaming_chat_reports_usage(pd_platform: Platform) -> None:
    c = openai.OpenAI(base_url=pd_platform.base_url, api_key="x", max_retries=0)
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=12, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


async def test_full_decode_memory_makes_prefill_wait_and_loses_nothing(
    tiny_dirs: dict[str, Path],
) -> None:
    model_dir = tiny_dirs["llama"]
    # 1 MiB of KV = 2048 tokens of the tiny llama; 8 prompts of ~400 tokens cannot all fit
    # every prompt split, so they all reserve decode memory first
    platform = _pd_platform(model_dir, "--prefill", "1", "--decode", "1", "--kv-cache-mb", "1",
                            *ALWAYS_SPLIT)
    try:
        tokenizer = TextTokenizer.from_dir(model_dir)
        text = "The baker opened his shop before the sun came up. " * 20
        prompts = [tokenizer.encode(f"{i} {text}") for i in range(8)]
        assert sum(len(p) for p in prompts) > 2048
        c = openai.AsyncOpenAI(base_url=platform.base_url, api_key="x", max_retries=0)
        results = await asyncio.gather(*(
            c.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0,
                                 extra_body={"ignore_eos": True})
            for p in prompts
        ))
        await c.close()
        for prompt, result in zip(prompts, results, strict=True):
            assert result.usage is not None and result.usage.completion_tokens == 24
            assert result.choices[0].text == tokenizer.decode(hf_greedy(model_dir, prompt, 24))
        decode_stats = httpx.get(f"{_engine_url(platform, 'decode')}/v1/stats",
                                 headers=platform.engine_headers()).json()
        assert decode_stats["num_memory_waits_total"] > 0, "prefill should have waited"
        prefill_stats = httpx.get(f"{_engine_url(platform, 'prefill')}/v1/stats",
                                  headers=platform.engine_headers()).json()
        assert prefill_stats["num_free_blocks"] == prefill_stats["num_total_blocks"]
    finally:
        assert platform.stop() == 0
