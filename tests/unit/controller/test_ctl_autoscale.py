"""The cluster autoscaler's pure part: Tasks -> observation, memory across rounds, what is
written (replicas patch, status, Event reason), and the gateway's wake counts."""

from __future__ import annotations

from typing import Any

from moeflow.controller import autoscale
from moeflow.domain import autoscale as policy
from moeflow.domain.autoscale import Decision, ScalePolicy, decide
from moeflow.domain.messages import EngineStats
from moeflow.domain.roles import Role
from moeflow.domain.spec import parse_model_spec

COLOCATED = {"source": {"uri": "store://m"},
             "roles": {"colocated": {"replicas": 1, "minReplicas": 0, "maxReplicas": 3}},
             "scaleToZeroAfterSeconds": 30}


def task(rank: int, *, ready: bool = True, ip: str | None = "10.0.0.1",
         cold_start: float | None = None, deleting: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"ready": ready}
    if ip:
        status["podIP"] = ip
    if cold_start is not None:
        status["coldStart"] = {"podReadySeconds": cold_start}
    meta: dict[str, Any] = {"name": f"m-colocated-{rank}"}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"rank": rank, "template": {"port": 8001}},
            "status": status}


def stats(instance: str = "m-colocated-0", *, running: int = 0, waiting: int = 0,
          prompt_tokens: int = 0) -> EngineStats:
    return EngineStats(instance_id=instance, role="colocated", num_waiting=waiting,
                       num_running=running, num_free_blocks=10, num_total_blocks=10,
                       num_prefix_hit_tokens=0, num_prompt_tokens_total=prompt_tokens,
                       num_preemptions_total=0)


def test_only_roles_with_max_replicas_are_autoscaled() -> None:
    assert autoscale.autoscaled_roles(parse_model_spec(COLOCATED)) == (Role.COLOCATED,)
    fixed = {"source": {"uri": "store://m"}, "roles": {"colocated": {"replicas": 2}}}
    assert autoscale.autoscaled_roles(parse_model_spec(fixed)) == ()
    assert autoscale.has_bounds(COLOCATED) and not autoscale.has_bounds(fixed)
    assert not autoscale.has_bounds({"roles": {"colocated": None}})


def test_read_tasks_counts_ready_engines_starting_ones_and_cold_starts() -> None:
    tasks = [task(0, cold_start=4.0), task(1, ready=False, cold_start=None),
             task(2, ip=None), task(3, deleting=True), task(5, cold_start=9.0)]
    seen = autoscale.read_tasks(tasks, replicas=4)
    assert seen.ready == (autoscale.Engine("m-colocated-0", "10.0.0.1", 8001),)
    assert seen.num_starting == 2  # not ready, and ready without a Pod IP yet
    assert seen.cold_starts_s == (4.0,)  # rank 5 >= replicas and rank 3 is going


def test_an_idle_role_goes_to_zero_after_the_window_and_counters_count_as_activity() -> None:
    spec = parse_model_spec(COLOCATED)
    policy = ScalePolicy.for_role(spec, Role.COLOCATED)
    engines = autoscale.read_tasks([task(0, cold_start=3.0)], replicas=1)
    memory = autoscale.first_memory(1, now_s=100.0)
    obs, memory = autoscale.observe(memory, replicas=1, tasks=engines,
                                    stats=[stats(prompt_tokens=5)], now_s=120.0)
    assert obs.seconds_since_last_request == 20.0 and obs.cold_start_s == 3.0
    assert decide(obs, policy).action == "hold"
    # The counter moved between rounds: a request came and went, the window starts again.
    obs, memory = autoscale.observe(memory, replicas=1, tasks=engines,
                                    stats=[stats(prompt_tokens=9)], now_s=140.0)
    assert obs.seconds_since_last_request == 0.0
    obs, memory = autoscale.observe(memory, replicas=1, tasks=engines,
                                    stats=[stats(prompt_tokens=9)], now_s=171.0)
    decision = decide(obs, policy)
    assert (decision.desired_replicas, decision.action) == (0, "idle")
    memory = autoscale.after_scale(memory, 0, now_s=171.0)
    # At zero the measured cold start is remembered for the next wake.
    obs, _ = autoscale.observe(memory, replicas=0, tasks=autoscale.read_tasks([], 0), stats=[],
                               now_s=180.0)
    assert obs.cold_start_s == 3.0 and obs.seconds_since_last_scale == 9.0


def test_a_ready_engine_that_gives_no_stats_is_neither_idle_nor_scaled_down() -> None:
    spec = parse_model_spec(COLOCATED)
    two = autoscale.read_tasks([task(0), task(1, ip="10.0.0.2")], replicas=2)
    memory = autoscale.first_memory(2, now_s=0.0)
    # Only one of two ready engines answers, long after the last request: its silence may
    # hide a queue, so the role stays active and keeps its replicas.
    obs, memory = autoscale.observe(memory, replicas=2, tasks=two, stats=[stats()], now_s=500.0)
    assert obs.num_unobserved == 1 and obs.seconds_since_last_request == 0.0
    assert decide(obs, ScalePolicy.for_role(spec, Role.COLOCATED)).desired_replicas == 2
    obs, _ = autoscale.observe(memory, replicas=2, tasks=two,
                               stats=[stats(), stats("m-colocated-1")], now_s=540.0)
    assert obs.num_unobserved == 0
    assert decide(obs, ScalePolicy.for_role(spec, Role.COLOCATED)).action == "idle"


def test_a_starting_replica_or_someone_elses_scale_keeps_the_role_active() -> None:
    memory = autoscale.first_memory(0, now_s=0.0)
    woken = autoscale.read_tasks([task(0, ready=False)], replicas=1)
    obs, memory = autoscale.observe(memory, replicas=1, tasks=woken, stats=[], now_s=500.0)
    assert obs.seconds_since_last_request == 0.0 and obs.seconds_since_last_scale == 0.0
    obs, memory = autoscale.observe(memory, replicas=1, tasks=woken, stats=[], now_s=900.0)
    assert obs.seconds_since_last_request == 0.0  # still starting: never idle
    busy = autoscale.read_tasks([task(0)], replicas=1)
    obs, _ = autoscale.observe(memory, replicas=1, tasks=busy, stats=[stats(waiting=2)],
                               now_s=905.0)
    assert obs.seconds_since_last_request == 0.0
    assert obs.waiting_growth_per_s == 2 / 5


def test_replicas_patch_is_locked_on_the_resource_version() -> None:
    assert policy.replicas_patch({Role.DECODE: 3}, "42") == {
        "metadata": {"resourceVersion": "42"},
        "spec": {"roles": {"decode": {"replicas": 3}}}}
    assert "metadata" not in policy.replicas_patch({Role.DECODE: 3}, None)


def test_wake_gives_every_role_at_zero_max_of_one_and_min() -> None:
    pd = parse_model_spec({
        "source": {"uri": "store://m"}, "mode": "pd-disaggregated",
        "transport": {"redisUrl": "redis://r:6379/0"},
        "roles": {"prefill": {"replicas": 0, "maxReplicas": 2},
                  "decode": {"replicas": 2, "minReplicas": 2, "maxReplicas": 4}}})
    assert policy.wake_replicas(pd) == {Role.PREFILL: 1}
    at_zero = parse_model_spec({**COLOCATED, "roles": {"colocated": {"replicas": 0}}})
    assert policy.wake_replicas(at_zero) == {Role.COLOCATED: 1}
    assert policy.wake_replicas(parse_model_spec(COLOCATED)) == {}  # awake: nothing to do
    capped = parse_model_spec({**COLOCATED, "roles": {"colocated": {
        "replicas": 0, "maxReplicas": 0}}})
    assert policy.wake_replicas(capped) == {}


def test_status_records_decisions_and_changes_only_on_desired_or_action() -> None:
    decisions = {Role.COLOCATED: Decision(0, "idle", "idle 31 s >= 30 s window: scale to 0")}
    written = autoscale.decision_status(decisions, now="2025-01-01T00:00:00Z", scaled=True)
    assert written == {"lastScaleTime": "2025-01-01T00:00:00Z", "autoscaling": {"colocated": {
        "desired": 0, "action": "idle", "reason": "idle 31 s >= 30 s window: scale to 0",
        "decidedAt": "2025-01-01T00:00:00Z"}}}
    assert not autoscale.status_changed(written, decisions)
    steady = {Role.COLOCATED: Decision(0, "idle", "another reason")}
    assert not autoscale.status_changed(written, steady)
    assert autoscale.status_changed(written, {Role.COLOCATED: Decision(0, "hold", "x")})
    assert autoscale.status_changed({}, decisions)
    assert "lastScaleTime" not in autoscale.decision_status(decisions, now="t", scaled=False)
    assert autoscale.event_reason(decisions[Role.COLOCATED]) == "AutoscaleIdle"
