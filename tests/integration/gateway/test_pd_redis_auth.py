"""Prefill/decode over a Redis that requires a password, the password only in
MOEFLOW_REDIS_PASSWORD (as an engine Pod gets it from `spec.transport.redisPasswordSecretRef`):
`moeflow up --mode pd --redis-url URL` hands it to its engine processes, KV moves through that
Redis, and the answer is the colocated engine's; the password appears in no log line."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from moeflow.text.tokenizer import TextTokenizer
from moeflow.xccl.redis_server import start_local_redis
from tests.platform_process import ALWAYS_SPLIT, free_port, start_platform
from tests.reference import make_engine, run_engine

PASSWORD = "pd-redis: p@ss/word"


def test_pd_moves_kv_through_a_password_protected_redis(
        tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tiny_dirs["llama"]
    with start_local_redis(tmp_path, port=free_port(), requirepass=PASSWORD) as redis:
        monkeypatch.setenv("MOEFLOW_REDIS_PASSWORD", PASSWORD)
        platform = start_platform(model_dir, [
            "--served-model-name", "tiny", "--mode", "pd", "--prefill", "1", "--decode", "1",
            *ALWAYS_SPLIT,
            "--transport", "redis", "--redis-url", redis.url])
        try:
            prompt = list(range(5, 40))
            (expected,), _ = run_engine(make_engine(model_dir), [prompt], max_tokens=8)
            client = openai.OpenAI(base_url=platform.base_url, api_key="x", max_retries=0)
            result = client.completions.create(model="tiny", prompt=prompt, max_tokens=8,
                                               temperature=0)
            assert result.usage is not None and result.usage.completion_tokens == 8
            assert result.choices[0].text == TextTokenizer.from_dir(model_dir).decode(expected)
            assert (platform.metric("moeflow_requests_by_mode_total", mode="split") or 0) >= 1
            assert (platform.metric("moeflow_kv_transfer_bytes_sum") or 0) > 0
        finally:
            assert platform.stop() == 0, platform.log()[-3000:]
        assert PASSWORD not in platform.log()
