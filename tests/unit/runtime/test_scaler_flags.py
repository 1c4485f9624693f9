"""`moeflow up` autoscaling flags: off by default, and what unset flags mean when on."""

from __future__ import annotations

import pytest

from moeflow.cli import build_parser, platform_settings
from moeflow.runtime.settings import LocalPlatformSettings


def _settings(*flags: str) -> LocalPlatformSettings:
    return platform_settings(build_parser().parse_args(["up", "--model", "/m", *flags]))


def test_autoscaling_is_off_unless_asked_for() -> None:
    assert not _settings().autoscaling.is_enabled
    assert not _settings("--instances", "3", "--scale-up-timeout-s", "9").autoscaling.is_enabled
    assert _settings("--min-replicas", "0").autoscaling.is_enabled
    assert _settings("--idle-window-s", "30").autoscaling.is_enabled


def test_scale_to_zero_flags_become_the_policy() -> None:
    s = _settings("--min-replicas", "0", "--max-replicas", "3", "--idle-window-s", "5")
    policy = s.autoscaling.policy(s.instances)
    assert (policy.min_replicas, policy.max_replicas, policy.idle_window_s) == (0, 3, 5.0)


def test_unset_bounds_keep_one_replica_up_to_the_instances() -> None:
    s = _settings("--instances", "2", "--idle-window-s", "60")
    policy = s.autoscaling.policy(s.instances)
    assert (policy.min_replicas, policy.max_replicas) == (1, 2)
    s = _settings("--max-replicas", "4")
    assert s.autoscaling.policy(s.instances).idle_window_s == 300.0


def test_scale_up_limits_reach_the_gateway_settings() -> None:
    settings = _settings("--max-waiting-for-scale-up", "20", "--scale-up-timeout-s", "7.5").gateway
    assert (settings.max_waiting_for_scale_up, settings.scale_up_timeout_s) == (20, 7.5)
    default = _settings().gateway
    assert (default.max_waiting_for_scale_up, default.scale_up_timeout_s) == (64, 300.0)


def test_slo_flags_reach_the_policy() -> None:
    s = _settings("--max-replicas", "2", "--slo-ttft-ms", "800", "--slo-tpot-ms", "120")
    policy = s.autoscaling.policy(s.instances)
    assert (policy.slo_ttft_ms, policy.slo_tpot_ms) == (800.0, 120.0)
    s = _settings("--max-replicas", "2")
    assert s.autoscaling.policy(s.instances).slo_ttft_ms is None


def test_autoscaling_is_refused_outside_colocated_mode() -> None:
    from moeflow.cli import InvalidSettings

    with pytest.raises(InvalidSettings, match="colocated only"):
        _settings("--mode", "pd", "--max-replicas", "2")


def test_recent_latencies_keep_only_the_window() -> None:
    from moeflow.gateway.metrics import RecentLatencies

    recent = RecentLatencies(max_samples=3)
    for seconds in (0.1, 0.2, 0.3, 0.4):
        recent.record_ttft(seconds)
    recent.record_tpot(0.05)
    ttft_ms, tpot_ms = recent.window(60.0)
    assert ttft_ms == pytest.approx([200.0, 300.0, 400.0])  # bounded: the oldest fell off
    assert tpot_ms == pytest.approx([50.0])
    assert recent.window(0.0) == ([], [])  # nothing is newer than now
