"""`moeflow up` and a Model's `spec.engine` speak the same engine arguments: every field of
`EngineArgs` has an `up` flag of the same (vLLM) name, and the flags, or the variables the
operator would put in the engine container, give the same engine settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from moeflow.cli import build_parser, platform_settings
from moeflow.domain.spec import EngineArgs, quantity_bytes
from moeflow.engine.config import EngineOptions

MODEL_ENGINE = EngineArgs.model_validate({
    "dtype": "bfloat16", "kvCacheMemory": "96Mi", "maxModelLen": 200, "maxNumSeqs": 3,
    "maxNumBatchedTokens": 64, "maxNumWaiting": 9, "blockSize": 32,
    "enablePrefixCaching": False, "numThreads": 1,
    "loraAdapters": {"toy": "/models/toy", "b": "/adapters/b"}, "loraMemory": "64Mi",
})


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MOEFLOW_") and name != "MOEFLOW_HOME":
            monkeypatch.delenv(name)


def up_flags(args: EngineArgs) -> list[str]:
    """The `moeflow up` flags of a Model's engine args, by name alone: `max_num_seqs` is
    `--max-num-seqs`, a boolean `enable_x` is `--enable-x` / `--no-x`."""
    flags: list[str] = []
    for name in type(args).model_fields:
        value: Any = getattr(args, name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else flag.replace("--enable-", "--no-"))
        elif isinstance(value, dict):  # repeated NAME=VALUE
            for key, item in value.items():
                flags += [flag, f"{key}={item}"]
        else:
            flags += [flag, str(value)]
    return flags


def test_every_model_engine_arg_is_an_up_flag_and_lands_in_the_settings() -> None:
    assert all(getattr(MODEL_ENGINE, n) is not None for n in EngineArgs.model_fields), (
        "set every field above, so that a new one needs its flag")
    engine = platform_settings(build_parser().parse_args(["up", *up_flags(MODEL_ENGINE)])).engine
    assert engine.dtype == "bfloat16"
    assert engine.kv_cache_bytes == quantity_bytes("96Mi") == 96 * 2**20
    assert (engine.max_model_len, engine.max_num_seqs, engine.max_num_batched_tokens) == (
        200, 3, 64)
    assert (engine.max_num_waiting, engine.block_size, engine.num_threads) == (9, 32, 1)
    assert engine.enable_prefix_caching is False
    assert engine.lora_adapters == {"toy": Path("/models/toy"), "b": Path("/adapters/b")}
    assert engine.lora_memory_bytes == 64 * 2**20
    assert engine != EngineOptions()


def test_the_models_engine_variables_give_up_the_same_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from_flags = platform_settings(build_parser().parse_args(["up", *up_flags(MODEL_ENGINE)]))
    for name, value in MODEL_ENGINE.engine_env().items():
        monkeypatch.setenv(name, value)
    from_env = platform_settings(build_parser().parse_args(["up"]))
    assert from_env.engine == from_flags.engine


def test_a_flag_beats_the_models_variable_and_prefix_caching_turns_back_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFLOW_ENGINE_ENABLE_PREFIX_CACHING", "false")
    monkeypatch.setenv("MOEFLOW_ENGINE_KV_CACHE_BYTES", str(2**30))
    s = platform_settings(build_parser().parse_args(
        ["up", "--enable-prefix-caching", "--kv-cache-memory", "1G"]))
    assert s.engine.enable_prefix_caching is True
    assert s.engine.kv_cache_bytes == 10**9


def test_a_bad_quantity_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["up", "--kv-cache-memory", "2GB"])
    assert exit_info.value.code == 2
    assert "is not a byte quantity; fix: write e.g. 512Mi or 2Gi" in capsys.readouterr().err
