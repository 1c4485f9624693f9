"""The autoscaler policy: one pure call per role, rules in the order its docstring gives."""

from __future__ import annotations

import math

import pytest

from moeflow.domain.autoscale import (
    Decision,
    RoleObservation,
    ScalePolicy,
    decide,
    quantile,
    queue_growth_per_s,
)
from moeflow.domain.messages import EngineStats
from moeflow.domain.roles import Role
from moeflow.domain.spec import parse_model_spec

POLICY = ScalePolicy(min_replicas=0, max_replicas=4, target_load_per_replica=4,
                     idle_window_s=60, scale_up_cooldown_s=10, scale_down_cooldown_s=30)


def stats(waiting: int = 0, running: int = 0, free_blocks: int = 100) -> EngineStats:
    return EngineStats(instance_id="i", role="colocated", num_waiting=waiting,
                       num_running=running, num_free_blocks=free_blocks, num_total_blocks=100,
                       num_prefix_hit_tokens=0, num_prompt_tokens_total=0,
                       num_preemptions_total=0)


def observe(current: int, *engine_stats: EngineStats, **fields: float) -> RoleObservation:
    return RoleObservation(current_replicas=current, stats=engine_stats, **fields)  # type: ignore[arg-type]


def test_a_request_waiting_at_zero_always_wakes_one_replica_despite_cooldown() -> None:
    d = decide(observe(0, num_held_at_gateway=1, seconds_since_last_scale=0), POLICY)
    assert (d.desired_replicas, d.action) == (1, "wake")
    assert "1 request(s) wait at zero" in d.reason


def test_wake_brings_the_role_to_its_minimum_when_that_is_higher() -> None:
    policy = ScalePolicy(min_replicas=2, max_replicas=3)
    assert decide(observe(0, num_held_at_gateway=5), policy).desired_replicas == 2


def test_nothing_waiting_at_zero_stays_at_zero() -> None:
    d = decide(observe(0, seconds_since_last_request=1e6), POLICY)
    assert (d.desired_replicas, d.action) == (0, "hold")


def test_outside_the_bounds_goes_to_the_bound() -> None:
    policy = ScalePolicy(min_replicas=2, max_replicas=3)
    assert decide(observe(1, stats()), policy) == Decision(2, "min", "1 replicas is below the "
                                                                    "minimum 2")
    assert decide(observe(5, stats()), policy).desired_replicas == 3


def test_queue_beyond_the_target_scales_up_to_what_the_load_needs_clamped_to_max() -> None:
    d = decide(observe(1, stats(waiting=6, running=4)), POLICY)
    assert (d.desired_replicas, d.action) == (3, "up")  # ceil(10 / 4)
    huge = decide(observe(1, stats(waiting=100)), POLICY)
    assert huge.desired_replicas == 4


def test_long_cold_start_scales_up_earlier_for_a_growing_queue() -> None:
    obs = {"waiting_growth_per_s": 1.0, "seconds_since_last_scale": math.inf}
    quick = decide(observe(1, stats(running=3), cold_start_s=0.5, **obs), POLICY)
    slow = decide(observe(1, stats(running=3), cold_start_s=20.0, **obs), POLICY)
    assert quick.action == "hold"
    assert (slow.desired_replicas, slow.action) == (4, "up")  # 3 + 20 projected -> 6 replicas
    assert "20.0 s cold start" in slow.reason


def test_slo_breach_adds_one_replica_even_at_low_load() -> None:
    policy = ScalePolicy(max_replicas=4, slo_ttft_ms=500, target_load_per_replica=8)
    ok = decide(observe(1, stats(running=1), ttft_ms=[100.0] * 9 + [900.0]), policy)
    slow = decide(observe(1, stats(running=1), ttft_ms=[900.0] * 5), policy)
    assert ok.action == "hold"
    assert (slow.desired_replicas, slow.action) == (2, "up")
    assert "ttft p90 900 ms > SLO 500 ms" in slow.reason


def test_a_nearly_full_kv_cache_adds_a_replica() -> None:
    d = decide(observe(1, stats(running=1, free_blocks=5)), POLICY)
    assert (d.desired_replicas, d.action) == (2, "up")
    assert "KV cache 95% full" in d.reason


def test_scale_up_waits_for_its_cooldown() -> None:
    d = decide(observe(1, stats(waiting=20), seconds_since_last_scale=3), POLICY)
    assert (d.desired_replicas, d.action) == (1, "hold")
    assert "cooldown" in d.reason


def test_idle_past_the_window_scales_to_the_minimum_zero_included() -> None:
    d = decide(observe(2, stats(), stats(), seconds_since_last_request=61), POLICY)
    assert (d.desired_replicas, d.action) == (0, "idle")
    floor = ScalePolicy(min_replicas=1, max_replicas=4, idle_window_s=60)
    assert decide(observe(2, stats(), seconds_since_last_request=61), floor).desired_replicas == 1


def test_no_idle_window_never_scales_to_zero() -> None:
    policy = ScalePolicy(max_replicas=2, idle_window_s=None, scale_down_cooldown_s=0)
    d = decide(observe(1, stats(), seconds_since_last_request=1e9), policy)
    assert d.desired_replicas == 1


def test_running_requests_are_never_idle_however_long_ago_the_last_arrived() -> None:
    d = decide(observe(1, stats(running=1), seconds_since_last_request=1e6), POLICY)
    assert d.desired_replicas == 1


def test_scale_down_is_one_step_after_the_cooldown_and_keeps_one_replica() -> None:
    light = observe(3, stats(running=1), stats(), stats(), seconds_since_last_scale=31,
                    seconds_since_last_request=1)
    d = decide(light, POLICY)
    assert (d.desired_replicas, d.action) == (2, "down")
    early = observe(3, stats(running=1), seconds_since_last_scale=5)
    assert decide(early, POLICY).action == "hold"
    one = observe(1, stats(running=1), seconds_since_last_scale=1e6)
    assert decide(one, POLICY).desired_replicas == 1


def test_an_instance_without_stats_blocks_scale_down_and_idling_but_not_scale_up() -> None:
    quiet = observe(3, stats(), stats(), seconds_since_last_scale=1e6,
                    seconds_since_last_request=1e6, num_unobserved=1)
    d = decide(quiet, POLICY)
    assert (d.desired_replicas, d.action) == (3, "hold")
    assert "1 ready instance(s) gave no stats" in d.reason
    busy = observe(1, stats(waiting=9), seconds_since_last_scale=1e6, num_unobserved=1)
    assert decide(busy, POLICY).action == "up"


def test_hysteresis_keeps_replicas_when_the_load_only_just_fits() -> None:
    # 6 requests fit in 2 replicas at the target of 4 (no scale-up from 2), but not at 70% of
    # it, so 3 replicas stay 3: the band between the two thresholds is what stops flapping
    three = [stats(running=2)] * 3
    d = decide(observe(3, *three, seconds_since_last_scale=1e6), POLICY)
    assert (d.desired_replicas, d.action) == (3, "hold")
    assert decide(observe(2, *three[:2], stats(running=2)), POLICY).desired_replicas == 2


def test_spec_bounds_and_slo_become_the_policy() -> None:
    spec = parse_model_spec({
        "source": {"uri": "file:///m"},
        "roles": {"colocated": {"replicas": 1, "minReplicas": 0, "maxReplicas": 3}},
        "slo": {"ttftMs": 800}, "scaleToZeroAfterSeconds": 120,
    })
    policy = ScalePolicy.for_role(spec, Role.COLOCATED, scale_up_cooldown_s=1)
    assert (policy.min_replicas, policy.max_replicas) == (0, 3)
    assert (policy.slo_ttft_ms, policy.idle_window_s, policy.scale_up_cooldown_s) == (800, 120, 1)
    fixed = ScalePolicy.for_role(parse_model_spec({"source": {"uri": "file:///m"}}),
                                 Role.COLOCATED)
    assert (fixed.max_replicas, fixed.idle_window_s) == (1, None)


def test_invalid_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="min_replicas"):
        ScalePolicy(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="max_replicas >= 1"):
        ScalePolicy(min_replicas=0, max_replicas=0)


def test_helpers() -> None:
    assert quantile([], 0.9) is None
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0] * 9 + [100.0], 0.9) == 1.0
    assert queue_growth_per_s(2, 6, 2.0) == 2.0
    assert queue_growth_per_s(2, 6, 0.0) == 0.0
