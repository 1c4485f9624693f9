"""Settings of `moeflow up`: one typed object, built once by the CLI and passed down.

``LocalPlatformSettings`` holds the gateway's ``GatewaySettings``, the ``EngineOptions`` every
engine child gets, the fleet (mode and instance counts), ``AutoscalingSettings`` and
``SupervisionSettings``. Each part reads its own environment variables (``MOEFLOW_GATEWAY_*``,
``MOEFLOW_ENGINE_*``, ``MOEFLOW_UP_*``); the CLI passes only the flags given, so the
precedence is flag > environment > the defaults written here (docs/configuration.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from moeflow.domain.autoscale import ScalePolicy
from moeflow.engine.config import EngineOptions
from moeflow.gateway.settings import GatewaySettings

Mode = Literal["colocated", "pd", "ae"]

MODE_ALIASES: dict[str, str] = {
    "pd-disaggregated": "pd",
    "attention-expert-disaggregated": "ae",
}
"""The Model CRD's names for the split modes, accepted wherever a short mode name is."""

_UP = SettingsConfigDict(env_prefix="MOEFLOW_UP_", frozen=True)


class AutoscalingSettings(BaseSettings):
    """Local autoscaling (``moeflow.runtime.scaler``): off unless one of ``min_replicas``,
    ``max_replicas`` or ``idle_window_s`` is set. Env prefix: ``MOEFLOW_UP_``."""

    model_config = _UP

    min_replicas: int | None = Field(None, ge=0)
    """Fewest engine instances; 0 allows scale to zero (unset when on: 1)."""
    max_replicas: int | None = Field(None, ge=1)
    """Most engine instances (unset when on: the platform's ``instances``)."""
    idle_window_s: float | None = Field(None, gt=0)
    """No request for this long: scale to ``min_replicas`` (unset when on: 300)."""
    slo_ttft_ms: float | None = Field(None, gt=0)
    """Scale up when the recent p90 time to first token is above this."""
    slo_tpot_ms: float | None = Field(None, gt=0)
    """Scale up when the recent p90 time per output token is above this."""

    @property
    def is_enabled(self) -> bool:
        return any(v is not None for v in (self.min_replicas, self.max_replicas,
                                           self.idle_window_s))

    def policy(self, instances: int) -> ScalePolicy:
        """The autoscaler policy; unset bounds: at least one replica, at most ``instances``,
        idle after 300 s."""
        low = 1 if self.min_replicas is None else self.min_replicas
        high = max(instances, low, 1) if self.max_replicas is None else self.max_replicas
        idle = 300.0 if self.idle_window_s is None else self.idle_window_s
        return ScalePolicy(min_replicas=low, max_replicas=high, idle_window_s=idle,
                           scale_up_cooldown_s=5.0, scale_down_cooldown_s=max(30.0, idle),
                           slo_ttft_ms=self.slo_ttft_ms, slo_tpot_ms=self.slo_tpot_ms)


class SupervisionSettings(BaseSettings):
    """How `moeflow up` keeps its processes running. Env prefix: ``MOEFLOW_UP_``."""

    model_config = _UP

    restart_backoff_initial_s: float = Field(0.5, gt=0)
    """Wait before restarting a process that died; doubles after each failed start."""
    restart_backoff_max_s: float = Field(10.0, gt=0)
    """The longest wait between two starts of one process."""
    max_start_failures: int = Field(5, ge=1)
    """Consecutive failed starts of one process (exit or no health before
    ``engine_start_timeout_s``) after which the platform gives up and exits non-zero."""
    engine_start_timeout_s: float = Field(300.0, gt=0)
    """Longest an engine may take from process start to answering /health."""
    stop_grace_s: float = Field(10.0, ge=0)
    """SIGTERM, then SIGKILL after this long (``moeflow.processes``)."""
    drain_timeout_s: float = Field(30.0, ge=0)
    """Scale-down: longest wait for an engine's in-flight requests before it is stopped."""
    poll_interval_s: float = Field(0.2, gt=0)
    """How often each supervised process is checked."""

    @model_validator(mode="after")
    def _check(self) -> SupervisionSettings:
        if self.restart_backoff_max_s < self.restart_backoff_initial_s:
            raise ValueError("restart_backoff_max_s must be >= restart_backoff_initial_s")
        return self


class LocalPlatformSettings(BaseSettings):
    """Everything `moeflow up` runs. Env prefix: ``MOEFLOW_UP_`` (gateway and engine parts:
    their own prefixes)."""

    model_config = _UP

    model: str = "smollm2-135m-instruct"
    """Cached model name (pulled when missing and pullable) or checkpoint folder."""
    served_model_name: str = ""
    """Name clients use; default: the last part of ``model``."""
    engine_port: int = Field(0, ge=0, le=65535)
    """First engine port, the rest consecutive; 0: a free port per engine."""
    mode: Mode = "colocated"
    """pd: prefill/decode disaggregation; ae: attention/expert (MoE models); both over XCCL.
    The CRD's names (pd-disaggregated, attention-expert-disaggregated) are accepted too."""
    instances: int = Field(1, ge=1)
    """Colocated engine instances (mode colocated only)."""
    prefill: int = Field(1, ge=1)
    """Prefill instances (mode pd)."""
    decode: int = Field(1, ge=1)
    """Decode instances (mode pd)."""
    attention: int = Field(1, ge=1)
    """Attention instances (mode ae)."""
    experts: int = Field(2, ge=1)
    """Expert *instances* (mode ae), not experts per layer; flag --expert-instances."""
    expert_budget: int = Field(-1, ge=-1)
    """--mode ae: extra expert replicas in total (-1: one per expert instance)."""
    rebalance_interval_s: float = Field(30.0, ge=0)
    """--mode ae: expert load balancing period (0: off)."""
    log_level: str = "INFO"
    """Passed to every engine child."""

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    engine: EngineOptions = Field(default_factory=EngineOptions)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    supervision: SupervisionSettings = Field(default_factory=SupervisionSettings)

    @field_validator("mode", mode="before")
    @classmethod
    def _crd_mode_names(cls, value: object) -> object:
        return MODE_ALIASES.get(value, value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> LocalPlatformSettings:
        if self.autoscaling.is_enabled and self.mode != "colocated":
            raise ValueError("autoscaling (min/max replicas, idle window) supports mode "
                             "colocated only for now")
        return self

    @property
    def name(self) -> str:
        """The served model name."""
        return self.served_model_name or self.model.rstrip("/").split("/")[-1]

    @property
    def is_split(self) -> bool:
        return self.mode in ("pd", "ae")
