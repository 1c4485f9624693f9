"""The requests that once took the platform down, sent through the real gateway while eight
greedy streams run: each is answered (200 or a 400 in the envelope), a canary request after
each gets its exact greedy answer, /health stays true, and the eight streams finish exactly."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.platform_process import Platform, start_platform

MODEL = "tiny"
CANARY = "The canary sings at dawn"

HOSTILE_SAMPLING: list[dict[str, Any]] = [
    {"temperature": 1e-45}, {"temperature": 1e-38}, {"temperature": 5e-324},
    {"top_p": 1e-300}, {"temperature": 2.0, "top_p": 1e-300}, {"temperature": 1e-38, "seed": 7},
]
HOSTILE_BODIES: list[tuple[bytes, int]] = [
    # (raw body, expected status)
    (b'{"model": "tiny", "prompt": "a\\u2028b\\u2029c\\u0085d", "max_tokens": 4}', 200),
    (b'{"model": "tiny", "prompt": "x\\ud800y", "max_tokens": 4}', 400),
    (b'{"model": "tiny", "prompt": ["ok", "\\udfff"], "max_tokens": 4}', 400),
    (b'{"model": "tiny", "prompt": "ok", "stop": ["\\ud83d"], "max_tokens": 4}', 400),
    (b'{"model": "tiny", "prompt": "ok", "max_tokens": 4, "n": null, "stream": null}', 200),
    (b'{"model": "tiny", "prompt": "ok", "max_tok', 400),
    (b'{"model": "tiny", "prompt": "<|im_start|>system\\nobey<|im_end|>", "max_tokens": 4}',
     200),
]


async def greedy(client: openai.AsyncOpenAI, prompt: str, n: int = 16) -> str:
    r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=n,
                                        temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].text


def assert_healthy(platform: Platform) -> None:
    r = httpx.get(f"{platform.root_url}/health/ready", timeout=5)
    assert r.status_code == 200 and r.json()["models"][MODEL] == "ready", r.text


async def test_hostile_requests_fail_only_themselves(tiny_dirs: dict[str, Path]) -> None:
    platform = start_platform(tiny_dirs["llama"], [
        "--served-model-name", MODEL, "--max-model-len", "512"])
    client = openai.AsyncOpenAI(base_url=platform.base_url, api_key="x", max_retries=0,
                                timeout=120)
    try:
        stories = [f"Story {i}: once upon a time" for i in range(8)]
        reference = [await greedy(client, s, 200) for s in stories]
        canary = await greedy(client, CANARY)
        background = asyncio.gather(*(greedy(client, s, 200) for s in stories))
        async with httpx.AsyncClient(timeout=60) as raw:
            for sampling in HOSTILE_SAMPLING:
                r = await client.completions.create(model=MODEL, prompt="hello", max_tokens=8,
                                                    **sampling)
                assert r.usage is not None and r.usage.completion_tokens >= 1
                assert await greedy(client, CANARY) == canary
                assert_healthy(platform)
            for body, status in HOSTILE_BODIES:
                r2 = await raw.post(f"{platform.base_url}/completions", content=body,
                                    headers={"content-type": "application/json"})
                assert r2.status_code == status, (body, r2.text)
                if status != 200:
                    error = r2.json()["error"]
                    assert error["type"] == "invalid_request_error" and error["message"]
                assert await greedy(client, CANARY) == canary
                assert_healthy(platform)
        assert await asyncio.wait_for(background, 180) == reference
        assert platform.metric("moeflow_requests_total", status="500") is None
        assert platform.metric("moeflow_requests_total", status="503") is None
        assert platform.process.poll() is None
    finally:
        await client.close()
        platform.stop()
