"""The real default model, served by `moeflow up` exactly as `make run` does, answers questions."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.platform_process import start_platform


@pytest.mark.slow
def test_smollm2_answers_through_moeflow_up(smollm2_dir: Path) -> None:
    platform = start_platform(
        "smollm2-135m-instruct", ["--max-model-len", "2048", "--kv-cache-mb", "128"]
    )
    try:
        c = openai.OpenAI(base_url=platform.base_url, api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list()] == ["smollm2-135m-instruct"]
        r = c.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=30,
            temperature=0,
        )
        assert "Paris" in (r.choices[0].message.content or "")
        assert r.choices[0].finish_reason == "stop"
    finally:
        assert platform.stop() == 0
