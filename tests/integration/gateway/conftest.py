from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.platform_process import Platform, start_platform

API_KEY = "test-secret-key-0123456789"


@pytest.fixture(scope="session")
def platform(tiny_dirs: dict[str, Path]) -> Iterator[Platform]:
    """The tiny llama served by `moeflow up` (gateway + one engine process)."""
    p = start_platform(
        tiny_dirs["llama"],
        ["--served-model-name", "tiny", "--max-model-len", "256", "--max-body-bytes", "65536"],
    )
    yield p
    assert p.stop() == 0, p.log()[-3000:]


@pytest.fixture(scope="session")
def guarded_platform(tiny_dirs: dict[str, Path]) -> Iterator[Platform]:
    """API keys on, and a gateway that holds at most 2 requests at once."""
    p = start_platform(
        tiny_dirs["qwen3_moe"],
        ["--served-model-name", "tiny-moe", "--api-key", API_KEY, "--max-in-flight", "2"],
    )
    yield p
    p.stop()
