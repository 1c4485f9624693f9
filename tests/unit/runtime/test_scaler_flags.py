"""`moeflow up` autoscaling flags: off by default, and what unset flags mean when on."""

from __future__ import annotations

import argparse

import pytest

from moeflow.cli import _gateway_settings, build_parser
from moeflow.gateway.settings import GatewaySettings
from moeflow.runtime.scaler import autoscaling_requested, policy_from_args


def _args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["up", "--model", "/m", *flags])


def test_autoscaling_is_off_unless_asked_for() -> None:
    assert not autoscaling_requested(_args())
    assert not autoscaling_requested(_args("--instances", "3", "--scale-up-timeout-s", "9"))
    assert autoscaling_requested(_args("--min-replicas", "0"))
    assert autoscaling_requested(_args("--idle-window-s", "30"))


def test_scale_to_zero_flags_become_the_policy() -> None:
    policy = policy_from_args(_args("--min-replicas", "0", "--max-replicas", "3",
                                    "--idle-window-s", "5"))
    assert (policy.min_replicas, policy.max_replicas, policy.idle_window_s) == (0, 3, 5.0)


def test_unset_bounds_keep_one_replica_up_to_the_instances() -> None:
    policy = policy_from_args(_args("--instances", "2", "--idle-window-s", "60"))
    assert (policy.min_replicas, policy.max_replicas) == (1, 2)
    assert policy_from_args(_args("--max-replicas", "4")).idle_window_s == 300.0


def test_scale_up_limits_reach_the_gateway_settings() -> None:
    settings = _gateway_settings(_args("--max-waiting-for-scale-up", "20",
                                       "--scale-up-timeout-s", "7.5"), [])
    assert isinstance(settings, GatewaySettings)
    assert (settings.max_waiting_for_scale_up, settings.scale_up_timeout_s) == (20, 7.5)
    default = _gateway_settings(_args(), [])
    assert isinstance(default, GatewaySettings)
    assert (default.max_waiting_for_scale_up, default.scale_up_timeout_s) == (64, 300.0)


def test_slo_flags_reach_the_policy() -> None:
    policy = policy_from_args(_args("--max-replicas", "2", "--slo-ttft-ms", "800",
                                    "--slo-tpot-ms", "120"))
    assert (policy.slo_ttft_ms, policy.slo_tpot_ms) == (800.0, 120.0)
    assert policy_from_args(_args("--max-replicas", "2")).slo_ttft_ms is None


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
