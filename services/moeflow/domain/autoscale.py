"""How many replicas a role should have (pure: plain data in, a count and a reason out).

One call of ``decide(observation, policy)`` looks at one role of one model. The rules, in order
(the first that applies wins; the result is always clamped to ``[min_replicas, max_replicas]``):

1. **Wake.** At zero replicas with requests held at the gateway: ``max(1, min_replicas)``. A
   request waiting at zero always gets at least one replica, whatever the cooldowns say.
2. **Bounds.** Below ``min_replicas`` or above ``max_replicas``: the bound.
3. **Scale up.** ``load`` is every request an instance or the gateway holds for the role
   (running + waiting + held for scale-up). A replica should carry ``target_load_per_replica``.
   Starting a replica takes ``cold_start_s``, and the queue keeps growing meanwhile, so the
   load counted is the *projected* one: ``load + growth_per_s * cold_start_s`` (lead time: the
   longer the cold start relative to the queue growth, the earlier the scale-up). Needed
   replicas are ``ceil(projected / target)``; an SLO breach (the ``slo_quantile`` of recent
   TTFT or TPOT above the Model's SLO) or a nearly full KV cache asks for at least one more.
   Scale-ups are at most one every ``scale_up_cooldown_s``.
4. **Idle.** No load and no request for ``idle_window_s``: ``min_replicas`` (zero when the
   minimum is zero). Only idleness takes a role to zero; ``idle_window_s=None`` never does.
5. **Scale down.** Hysteresis: only when the load would fit in fewer replicas at
   ``scale_down_headroom`` of the target, no pressure signal is on, and the last scale event is
   ``scale_down_cooldown_s`` old; then one replica at a time, never below one.
6. Otherwise hold.

The caller measures (time since the last request, queue growth, cold start); this module only
decides, so it runs in microseconds and the local scaler and the operator can share it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moeflow.domain.messages import EngineStats
from moeflow.domain.roles import Role
from moeflow.domain.spec import ModelSpec


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    """Bounds and thresholds for one role. Times in seconds, latencies in milliseconds."""

    min_replicas: int = 0
    max_replicas: int = 1
    target_load_per_replica: float = 8.0
    """Requests (running + waiting) one replica should carry."""
    max_kv_usage: float = 0.9
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_quantile: float = 0.9
    idle_window_s: float | None = 300.0
    """No request for this long -> ``min_replicas``; None: never go idle."""
    scale_up_cooldown_s: float = 10.0
    scale_down_cooldown_s: float = 60.0
    scale_down_headroom: float = 0.7

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"need 0 <= min_replicas ({self.min_replicas}) <= max_replicas "
                f"({self.max_replicas}) and max_replicas >= 1"
            )
        if self.target_load_per_replica <= 0 or not 0 < self.scale_down_headroom <= 1:
            raise ValueError("target_load_per_replica must be > 0, scale_down_headroom in (0, 1]")

    @classmethod
    def for_role(cls, spec: ModelSpec, role: Role, **overrides: float | None) -> ScalePolicy:
        """A Model's bounds and SLO for ``role``; ``scaleToZeroAfterSeconds`` is the idle window
        (0: never idle). Without ``maxReplicas`` the role does not grow past ``replicas``."""
        role_spec = spec.role(role)
        high = role_spec.max_replicas
        if high is None:
            high = max(role_spec.replicas, role_spec.min_replicas, 1)
        idle = spec.scale_to_zero_after_seconds
        fields: dict[str, float | None] = {
            "slo_ttft_ms": spec.slo.ttft_ms, "slo_tpot_ms": spec.slo.tpot_ms,
            "idle_window_s": float(idle) if idle else None, **overrides,
        }
        return cls(role_spec.min_replicas, max(high, 1), **fields)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class RoleObservation:
    """What the caller saw of one role just now."""

    current_replicas: int
    """Instances alive: ready or starting."""
    stats: Sequence[EngineStats] = ()
    """Of the ready instances."""
    num_held_at_gateway: int = 0
    """Requests the gateway holds while it waits for a replica (scale from zero)."""
    ttft_ms: Sequence[float] = ()
    tpot_ms: Sequence[float] = ()
    waiting_growth_per_s: float = 0.0
    """How fast the total queue grows (negative: shrinks)."""
    cold_start_s: float = 0.0
    """Measured time from starting a replica to its first ready answer."""
    seconds_since_last_request: float = 0.0
    seconds_since_last_scale: float = math.inf
    num_unobserved: int = 0
    """Ready instances whose stats did not come back this round. Their load is unknown, so
    it may be anything: the policy never scales down or idles on a partial view."""


@dataclass(frozen=True, slots=True)
class Decision:
    desired_replicas: int
    action: str
    """wake, min, max, up, idle, down or hold (the rule that decided)."""
    reason: str


def quantile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def queue_growth_per_s(previous_waiting: int, waiting: int, elapsed_s: float) -> float:
    return 0.0 if elapsed_s <= 0 else (waiting - previous_waiting) / elapsed_s


def _pressure(obs: RoleObservation, policy: ScalePolicy) -> list[str]:
    signals: list[str] = []
    for name, values, slo in (("ttft", obs.ttft_ms, policy.slo_ttft_ms),
                              ("tpot", obs.tpot_ms, policy.slo_tpot_ms)):
        observed = quantile(values, policy.slo_quantile)
        if slo is not None and observed is not None and observed > slo:
            signals.append(f"{name} p{round(100 * policy.slo_quantile)} {observed:.0f} ms "
                           f"> SLO {slo:.0f} ms")
    kv = max((s.kv_usage_ratio for s in obs.stats), default=0.0)
    if kv > policy.max_kv_usage:
        signals.append(f"KV cache {kv:.0%} full > {policy.max_kv_usage:.0%}")
    return signals


def decide(obs: RoleObservation, policy: ScalePolicy) -> Decision:
    """The replicas this role should have now, and why (see the module docstring)."""
    current = obs.current_replicas
    low, high = policy.min_replicas, policy.max_replicas

    def result(desired: int, action: str, reason: str) -> Decision:
        desired = min(max(desired, low), high)
        return Decision(desired, action if desired != current else "hold", reason)

    if current == 0 and obs.num_held_at_gateway > 0:
        return result(max(1, low), "wake",
                      f"wake: {obs.num_held_at_gateway} request(s) wait at zero replicas")
    if current < low:
        return result(low, "min", f"{current} replicas is below the minimum {low}")
    if current > high:
        return result(high, "max", f"{current} replicas is above the maximum {high}")

    load = sum(s.num_running + s.num_waiting for s in obs.stats) + obs.num_held_at_gateway
    projected = load + max(0.0, obs.waiting_growth_per_s) * obs.cold_start_s
    needed = math.ceil(projected / policy.target_load_per_replica)
    pressure = _pressure(obs, policy)
    if pressure:
        needed = max(needed, current + 1)
    if needed > current:
        if current > 0 and obs.seconds_since_last_scale < policy.scale_up_cooldown_s:
            return result(current, "hold",
                          f"scale-up cooldown ({policy.scale_up_cooldown_s:.0f} s)")
        why = [f"load {load} (projected {projected:.1f} over a {obs.cold_start_s:.1f} s cold "
               f"start) needs {needed} at {policy.target_load_per_replica:g} per replica",
               *pressure]
        return result(needed, "up", "scale up: " + "; ".join(why))

    if obs.num_unobserved > 0:
        return result(current, "hold", f"{obs.num_unobserved} ready instance(s) gave no "
                                       "stats: not scaling down on a partial view")
    idle = policy.idle_window_s
    if load == 0 and idle is not None and obs.seconds_since_last_request >= idle:
        if current > low:
            return result(low, "idle", f"idle {obs.seconds_since_last_request:.0f} s >= "
                                       f"{idle:g} s window: scale to {low}")
        return result(current, "hold", "idle at the minimum")

    fits = math.ceil(load / (policy.target_load_per_replica * policy.scale_down_headroom))
    floor = max(low, 1)
    if current > floor and fits < current and not pressure:
        if obs.seconds_since_last_scale < policy.scale_down_cooldown_s:
            return result(current, "hold",
                          f"scale-down cooldown ({policy.scale_down_cooldown_s:.0f} s)")
        return result(max(current - 1, fits, floor), "down",
                      f"scale down: load {load} fits in {max(fits, floor)} replica(s)")
    return result(current, "hold", f"steady: load {load} on {current} replica(s)")


def replicas_patch(replicas: Mapping[Role, int], resource_version: str | None
                   ) -> dict[str, Any]:
    """A merge patch of ``spec.roles.<role>.replicas``; with a resourceVersion it is an
    optimistic lock (409 if the Model moved since it was read)."""
    patch: dict[str, Any] = {"spec": {"roles": {
        role.value: {"replicas": count} for role, count in replicas.items()}}}
    if resource_version is not None:
        patch["metadata"] = {"resourceVersion": resource_version}
    return patch


def wake_replicas(spec: ModelSpec) -> dict[Role, int]:
    """Scale from zero: every role of the mode at zero replicas gets ``max(1, minReplicas)``
    (a prefill/decode Model needs both roles to serve). Roles whose ``maxReplicas`` is 0 cannot
    wake and are left out; an empty result means there is nothing to do."""
    wanted: dict[Role, int] = {}
    for role in spec.role_names:
        role_spec = spec.role(role)
        if role_spec.replicas > 0:
            continue
        count = max(1, role_spec.min_replicas)
        if role_spec.max_replicas is not None:
            count = min(count, role_spec.max_replicas)
        if count > 0:
            wanted[role] = count
    return wanted
