"""One settings object per process: flag > environment > the settings' own default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeflow.cli import (
    InvalidSettings,
    build_parser,
    engine_settings,
    env_names,
    gateway_settings,
    platform_settings,
)
from moeflow.cli.flags import SECTIONS
from moeflow.engine.config import EngineOptions, EngineSettings
from moeflow.runtime.settings import LocalPlatformSettings

DOCS = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MOEFLOW_* variable of the machine running the tests leaks in."""
    import os

    for name in list(os.environ):
        if name.startswith("MOEFLOW_") and name != "MOEFLOW_HOME":
            monkeypatch.delenv(name)


def _up(*flags: str) -> LocalPlatformSettings:
    return platform_settings(build_parser().parse_args(["up", *flags]))


def test_unset_flags_fall_back_to_the_settings_defaults() -> None:
    s = _up()
    assert (s.gateway.port, s.gateway.max_in_flight_requests, s.gateway.api_keys) == (
        8000, 256, ())
    assert s.engine == EngineOptions()  # the defaults live in one place
    assert (s.model, s.instances, s.mode) == ("smollm2-135m-instruct", 1, "colocated")
    assert s.supervision.max_start_failures == 5


def test_environment_applies_when_the_flag_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFLOW_GATEWAY_PORT", "9123")
    monkeypatch.setenv("MOEFLOW_ENGINE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("MOEFLOW_UP_INSTANCES", "3")
    monkeypatch.setenv("MOEFLOW_UP_MAX_START_FAILURES", "2")
    monkeypatch.setenv("MOEFLOW_UP_IDLE_WINDOW_S", "45")
    s = _up()
    assert (s.gateway.port, s.engine.max_num_seqs, s.instances) == (9123, 7, 3)
    assert s.supervision.max_start_failures == 2
    assert s.autoscaling.is_enabled and s.autoscaling.idle_window_s == 45.0
    gateway = gateway_settings(build_parser().parse_args(["gateway"]))
    assert gateway.port == 9123


def test_a_given_flag_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEFLOW_GATEWAY_PORT", "9123")
    monkeypatch.setenv("MOEFLOW_ENGINE_KV_CACHE_BYTES", str(1 << 20))
    monkeypatch.setenv("MOEFLOW_UP_INSTANCES", "3")
    s = _up("--port", "9200", "--kv-cache-mb", "64", "--instances", "2")
    assert (s.gateway.port, s.engine.kv_cache_bytes, s.instances) == (9200, 64 << 20, 2)
    monkeypatch.setenv("MOEFLOW_ENGINE_ENABLE_PREFIX_CACHING", "true")
    assert _up("--no-prefix-caching").engine.enable_prefix_caching is False
    assert _up().engine.enable_prefix_caching is True


def test_api_keys_come_comma_separated_from_the_chart_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MOEFLOW_API_KEYS", "k1, k2,")
    keys = _up().gateway.api_keys
    assert [k.get_secret_value() for k in keys] == ["k1", "k2"]
    flagged = _up("--api-key", "only").gateway.api_keys  # the flag replaces the list
    assert [k.get_secret_value() for k in flagged] == ["only"]
    monkeypatch.setenv("MOEFLOW_INTERNAL_TOKEN", "tok")
    token = _up().gateway.internal_token
    assert token is not None and token.get_secret_value() == "tok"


def test_engine_process_settings_follow_the_same_rule(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setenv("MOEFLOW_TRANSPORT", "redis")  # what the operator sets on Pods
    monkeypatch.setenv("MOEFLOW_REDIS_URL", "redis://r:6379/0")
    monkeypatch.setenv("MOEFLOW_ENGINE_MODEL_STORE", str(tmp_path))
    monkeypatch.setenv("MOEFLOW_ENGINE_PORT", "8111")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # a checkpoint folder
    args = build_parser().parse_args(["engine", "--model", str(tmp_path), "--rank", "2"])
    s = engine_settings(args, tmp_path)
    assert (s.transport, s.redis_url, s.model_store) == ("redis", "redis://r:6379/0", tmp_path)
    assert (s.port, s.rank, s.max_num_seqs) == (8111, 2, 64)
    monkeypatch.setenv("MOEFLOW_ENGINE_TRANSPORT", "shm")  # the prefixed name wins
    assert engine_settings(args, tmp_path).transport == "shm"
    flagged = build_parser().parse_args(["engine", "--model", str(tmp_path), "--transport",
                                         "redis", "--port", "8222"])
    s = engine_settings(flagged, tmp_path)
    assert (s.transport, s.port) == ("redis", 8222)


def test_options_reach_engine_children_through_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    options = EngineOptions(dtype="bfloat16", kv_cache_bytes=3 << 20, redis_url="redis://x/0",
                            transport="redis", enable_prefix_caching=False)
    monkeypatch.setenv("MOEFLOW_TRANSPORT", "shm")  # stale, inherited: must not win
    monkeypatch.setenv("MOEFLOW_ENGINE_MODEL_STORE", "/stale")
    for key, value in options.as_env().items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    child = EngineSettings(model_path=tmp_path)  # what the child builds with no such flags
    assert EngineOptions.model_validate(child.model_dump(include=set(
        EngineOptions.model_fields))) == options


def test_invalid_values_are_refused_with_the_setting_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MOEFLOW_GATEWAY_PORT", "99999")
    with pytest.raises(InvalidSettings, match="port"):
        _up()


def test_every_documented_variable_sets_a_setting() -> None:
    """docs/configuration.md names no variable that nothing reads."""
    known = {name for section, cls in SECTIONS.items() for field in cls.model_fields
             if field not in ("gateway", "engine", "autoscaling", "supervision")
             for name in env_names(section, field)}
    documented = set(re.findall(r"MOEFLOW_(?:GATEWAY|ENGINE|UP)_[A-Z0-9_]+|MOEFLOW_API_KEYS|"
                                r"MOEFLOW_INTERNAL_TOKEN|MOEFLOW_TRANSPORT|MOEFLOW_REDIS_URL",
                                DOCS.read_text()))
    assert documented, "the docs list the variables"
    assert documented <= known, sorted(documented - known)
    assert {"MOEFLOW_GATEWAY_PORT", "MOEFLOW_ENGINE_KV_CACHE_BYTES", "MOEFLOW_UP_INSTANCES",
            "MOEFLOW_UP_MAX_START_FAILURES"} <= documented  # every part has its table
