"""Settings of the gateway process: built once at the entry point and passed down.

Values come from, in this order: the constructor (the CLI passes only the flags given), the
environment (``MOEFLOW_GATEWAY_<FIELD>``, plus the aliases named below), then the defaults
here, which are the only defaults (docs/configuration.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def split_commas(value: object) -> object:
    """Environment lists are comma-separated (``k1,k2``); blanks are dropped."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class GatewaySettings(BaseSettings):
    """Every limit is explicit. Env prefix: ``MOEFLOW_GATEWAY_``."""

    model_config = SettingsConfigDict(env_prefix="MOEFLOW_GATEWAY_", frozen=True,
                                      validate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    engine_urls: Annotated[tuple[str, ...], NoDecode] = ()
    """Engine instances to serve (static discovery: the local runtime passes these); env:
    comma-separated."""
    discovery: Literal["static", "kubernetes"] = "static"
    """kubernetes: follow the Task objects of ``served_model_name`` in ``namespace``."""
    namespace: str = "default"
    kube_scale_from_zero: bool = True
    """With kubernetes discovery: a request for a model at zero replicas patches the Model's
    ``spec.roles.<role>.replicas`` to wake it (``moeflow.gateway.kube_scale``) and waits."""
    served_model_name: str = ""
    discovery_interval_s: float = Field(2.0, gt=0)
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), validation_alias=AliasChoices("MOEFLOW_GATEWAY_API_KEYS", "MOEFLOW_API_KEYS"))
    """When set, every /v1 request needs ``Authorization: Bearer <key>``; never logged. Env:
    comma-separated, ``MOEFLOW_API_KEYS`` (what the Helm chart sets) or the prefixed name."""
    internal_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("MOEFLOW_GATEWAY_INTERNAL_TOKEN",
                                            "MOEFLOW_INTERNAL_TOKEN"))
    """Shared secret of one platform's internal calls (gateway -> engine); ``moeflow up``
    generates one per platform and gives the engines the same value (MOEFLOW_INTERNAL_TOKEN)."""

    admin_api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), validation_alias=AliasChoices("MOEFLOW_GATEWAY_ADMIN_API_KEYS",
                                          "MOEFLOW_ADMIN_API_KEYS"))
    """Keys of the tenant ``admin``, which may read /metrics, /status and /admin/usage; env:
    comma-separated. With no admin key anywhere, the flat ``api_keys`` are admin keys."""
    tenants_file: Path | None = None
    """Tenants with hashed keys and limits (YAML or JSON; ``moeflow.gateway.tenants``); on a
    cluster a mounted Secret. Re-read when it changes, no restart."""
    tenants_reload_interval_s: float = Field(2.0, ge=0)
    """How often, at most, the tenants file is checked for changes (on the request path)."""
    quota_redis_url: SecretStr | None = None
    """Redis that holds the tenants' counters, shared by every replica
    (``redis://host:6379/0``); unset: counters in this replica's memory."""
    quota_redis_password: SecretStr | None = Field(None, validation_alias=AliasChoices(
        "MOEFLOW_GATEWAY_QUOTA_REDIS_PASSWORD", "MOEFLOW_REDIS_PASSWORD"))
    """Its password when the URL has none (a password in the URL wins); on a cluster from a
    Secret by ``secretKeyRef`` (env ``MOEFLOW_REDIS_PASSWORD``, as engines)."""
    quota_on_redis_failure: Literal["open", "closed"] = "open"
    """Redis unreachable: ``open`` enforces limits per replica (local counters), ``closed``
    refuses /v1 requests with 503 until it is back."""
    quota_key_prefix: str = "moeflow:quota:"
    usage_retention_days: int = Field(35, ge=1)
    """How long hourly usage rows stay in Redis."""

    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    """Largest accepted request body; bigger bodies get 413."""
    max_in_flight_requests: int = Field(256, ge=1)
    """Requests the gateway holds at once; past it, 429 with Retry-After."""
    retry_after_s: int = Field(1, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    """Longest a single request may take end to end."""
    max_failovers: int = Field(3, ge=0)
    """Times a request may move to another instance after its instance failed (before or
    mid-stream); past it, or past ``request_timeout_s``, the client gets one clear 503."""
    failover_wait_s: float = Field(30.0, ge=0)
    """When a model has instances but none is healthy (restarting, Redis down), a request
    waits this long for one to come back before it gets 503."""
    engine_connect_timeout_s: float = Field(5.0, gt=0)
    engine_startup_timeout_s: float = Field(300.0, gt=0)
    """How long to wait at start-up for engine instances to report their model."""
    stats_poll_interval_s: float = Field(1.0, gt=0)
    max_stop_sequences: int = Field(16, ge=0)
    max_prompts_per_request: int = Field(64, ge=1)
    pd_min_prompt_tokens: int = Field(256, ge=0)
    """Shorter prompts are never split: they are computed where they are decoded."""
    pd_interference_weight: float = Field(1.0, ge=0)
    """A long prompt is computed locally instead of split when the prefill queue (in prompt
    tokens) exceeds the local queue plus this weight x the prompt x the requests decoding
    locally (routing.split_or_local); 0: whenever the prefill queue is longer."""
    max_waiting_for_scale_up: int = Field(64, ge=0)
    """Requests held per model while it scales up from zero; past it, 429 with Retry-After."""
    scale_up_timeout_s: float = Field(300.0, gt=0)
    """Longest a request waits for a model to scale up from zero; then 503."""
    keep_alive_interval_s: float = Field(5.0, gt=0)
    """SSE comment interval for streaming requests that wait for a scale-up."""

    @field_validator("engine_urls", "api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _split_env_lists(cls, value: object) -> object:
        return split_commas(value)
