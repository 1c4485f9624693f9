"""API keys and the in-flight bound, against `moeflow up --api-key K --max-in-flight 2`."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.integration.gateway.conftest import API_KEY
from tests.platform_process import Platform

MODEL = "tiny-moe"
MESSAGES = [{"role": "user", "content": "hello"}]


def test_missing_or_wrong_key_gets_401_envelope(guarded_platform: Platform) -> None:
    url = f"{guarded_platform.base_url}/chat/completions"
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    missing = httpx.post(url, json=body)
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
    for r in (missing, wrong):
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded_platform.base_url, api_key="nope").models.list()


def test_right_key_works_and_is_never_logged(guarded_platform: Platform) -> None:
    c = openai.OpenAI(base_url=guarded_platform.base_url, api_key=API_KEY, max_retries=0)
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.completion_tokens >= 1
    assert httpx.get(f"{guarded_platform.root_url}/health").status_code == 200
    assert API_KEY not in guarded_platform.log()


async def test_overload_gets_429_with_retry_after_and_others_finish(
    guarded_platform: Platform,
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 60, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=60, headers=headers) as http:
        responses = await asyncio.gather(
            *(http.post(f"{guarded_platform.base_url}/chat/completions", json=body)
              for _ in range(8))
        )
    codes = sorted(r.status_code for r in responses)
    assert 429 in codes and 200 in codes, codes
    assert set(codes) <= {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "overloaded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 60
