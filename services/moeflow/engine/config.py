"""Settings of one engine instance: built once at the entry point and passed down.

``EngineOptions`` are what a deployment sets alike for all its instances (dtype, memory, batch
limits, transport); ``EngineSettings`` adds what names one instance (model, role, rank, port).
Values come from, in this order: the constructor (the CLI passes only the flags given), the
environment (``MOEFLOW_ENGINE_<FIELD>``, plus the aliases named below), then the defaults here,
which are the only defaults (docs/configuration.md).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from moeflow.domain.roles import Role

DType = Literal["float32", "bfloat16"]


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_limit_threads(cgroup_root: Path = CGROUP_ROOT, *, available: int | None = None) -> int:
    """How many threads the container's CPU limit pays for: ceil(quota / period) from cgroup v2
    `cpu.max` ("<quota> <period>", quota "max" = no limit) or cgroup v1
    `cpu/cpu.cfs_quota_us` and `cpu/cpu.cfs_period_us` (quota -1 = no limit), never more than
    `available` (default: the CPUs this process may run on), at least 1. Without a limit, or
    where the files are missing or unreadable, `available`. `cgroup_root` is injectable so
    tests can give a made-up limit; reading it is the only I/O."""
    cpus = available if available is not None else len(os.sched_getaffinity(0))
    quota = period = None
    try:
        fields = (cgroup_root / "cpu.max").read_text().split()
        if len(fields) == 2 and fields[0] != "max":
            quota, period = int(fields[0]), int(fields[1])
    except (OSError, ValueError):
        try:
            v1 = cgroup_root / "cpu"
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            quota = period = None
    if quota is None or period is None or quota <= 0 or period <= 0:
        return max(1, cpus)
    return max(1, min(cpus, math.ceil(quota / period)))


class EngineOptions(BaseSettings):
    """The limits every instance of a deployment shares. Env prefix: ``MOEFLOW_ENGINE_``."""

    model_config = SettingsConfigDict(env_prefix="MOEFLOW_ENGINE_", frozen=True,
                                      validate_by_name=True)

    dtype: DType = "float32"
    """float32 reproduces Hugging Face outputs exactly; bfloat16 halves the bytes per token."""
    num_threads: int = Field(0, ge=0)
    """torch intra-op threads; 0 means as many as the container's CPU limit pays for
    (``cpu_limit_threads``), never every core of the node."""
    bind_threads: bool = False
    """Pin the compute threads one per CPU (the first ``num_threads`` CPUs this process may
    use), as vLLM-CPU does; needs the C kernels. Off by default: see docs/benchmarks.md."""
    cgroup_root: Path = CGROUP_ROOT
    """Where the container's cgroup (its CPU limit) is read from; tests point it elsewhere."""

    block_size: int = Field(16, ge=1, le=1024)
    """Tokens per KV-cache block."""
    kv_cache_bytes: int = Field(512 * 1024 * 1024, ge=4096)
    """Memory for the paged KV cache; the number of blocks follows from the model's shape."""
    max_model_len: int = Field(0, ge=0)
    """Longest prompt + output in tokens; 0 means min(model's max positions, 8192)."""
    max_num_seqs: int = Field(64, ge=1)
    """Most sequences running in one step (decode batch size)."""
    max_num_batched_tokens: int = Field(512, ge=16)
    """Token budget of one step; long prompts are prefilled in chunks of at most this many."""
    prefill_max_wait_s: float = Field(2.0, ge=0)
    """Prefill goes to the shortest remaining prompts first; one that has waited this long
    since it arrived goes before all others (so a long prompt is never starved). 0: arrival
    order."""
    max_num_waiting: int = Field(256, ge=1)
    """Bounded admission queue; past it, new requests get 429 Overloaded."""
    enable_prefix_caching: bool = True

    # -- LoRA adapters (engine.lora, docs/finetuning.md "Serving adapters") --
    lora_adapters: dict[str, Path] = Field(default_factory=dict)
    """Adapters to load at start, name -> PEFT folder (``--lora NAME=PATH``, repeatable)."""
    lora_memory_bytes: int = Field(256 * 1024 * 1024, ge=0)
    """Memory for resident adapters; past it the least recently used idle ones are evicted."""

    @field_validator("lora_adapters", mode="before")
    @classmethod
    def _name_equals_path(cls, value: object) -> object:
        # the CLI's repeated --lora NAME=PATH arrives as a list of strings
        if isinstance(value, list | tuple):
            pairs = {}
            for item in value:
                name, sep, path = str(item).partition("=")
                if not sep or not name or not path:
                    raise ValueError(f"--lora takes NAME=PATH, got {item!r}")
                pairs[name] = path
            return pairs
        return value

    # -- cold start (moeflow.coldstart, docs/coldstart.md) --
    model_store: Path | None = None
    """Node model store (e.g. /dev/shm/moeflow-store): weights are mapped from it when it holds
    this model in this dtype; otherwise the checkpoint is loaded."""
    warmup: bool = True
    """Run one tiny request through the model before reporting ready."""

    transport: Literal["shm", "redis", "memory"] = Field("shm", validation_alias=AliasChoices(
        "MOEFLOW_ENGINE_TRANSPORT", "MOEFLOW_TRANSPORT"))
    """XCCL backend for KV transfer (prefill/decode) and expert dispatch/combine
    (attention/expert); "memory" joins endpoints inside one process (tests only)."""
    redis_url: str | None = Field(None, validation_alias=AliasChoices(
        "MOEFLOW_ENGINE_REDIS_URL", "MOEFLOW_REDIS_URL"))
    """Redis of ``transport`` redis (Pods get ``MOEFLOW_REDIS_URL`` from the operator)."""
    redis_password: SecretStr | None = Field(None, validation_alias=AliasChoices(
        "MOEFLOW_ENGINE_REDIS_PASSWORD", "MOEFLOW_REDIS_PASSWORD"))
    """Password of that Redis when its URL has none (Pods get ``MOEFLOW_REDIS_PASSWORD`` from
    the Secret in ``spec.transport.redisPasswordSecretRef``); never logged."""
    kv_transfer_timeout_s: float = Field(60.0, gt=0)
    """Longest a decode instance waits for a prompt's KV (includes the prefill itself)."""

    num_micro_batches: int = Field(2, ge=1, le=8)
    """Attention role: micro-batches per step, so attention overlaps the experts' work."""
    micro_batch_min_tokens: int = Field(64, ge=1)
    """Attention role: split a step only when every micro-batch gets at least this many tokens.
    Each micro-batch makes the experts stream their weights again; with few tokens (decode)
    that costs more than the overlap gains (measured: benchmarks/moe.py)."""
    ae_spin_us: int = Field(0, ge=0, le=1_000_000)
    """Attention and expert roles on ``transport`` shm: > 0 moves the expert exchange onto
    shared-memory rings (``moeflow.xccl.ring``) whose receivers poll this many microseconds
    after each message (yielding the core between polls) before they block for a doorbell; 0
    keeps every message on the transport (a datagram that wakes the receiver). Measured in
    docs/benchmarks.md (MoE)."""
    expert_timeout_s: float = Field(30.0, gt=0)
    """Attention role: longest wait for an expert instance's answer before it counts as
    dead (its pairs then go to another replica, or the step's requests fail)."""

    @property
    def redis_password_value(self) -> str | None:
        """The Redis password in clear (for the XCCL Redis client), or None."""
        return self.redis_password.get_secret_value() if self.redis_password else None

    def resolved_num_threads(self) -> int:
        """`num_threads`, or when 0 the container's CPU limit (``cpu_limit_threads``)."""
        return self.num_threads or cpu_limit_threads(self.cgroup_root)

    def as_env(self) -> dict[str, str | None]:
        """These options as environment variables for a child process (None: unset it), so
        the child's ``EngineSettings`` equal them unless its flags say otherwise. Aliases get
        the same value: an inherited ``MOEFLOW_TRANSPORT`` must not disagree with them."""
        values = self.model_dump(mode="json", include=set(EngineOptions.model_fields))
        env: dict[str, str | None] = {}
        for name, field in EngineOptions.model_fields.items():
            raw = getattr(self, name)
            # the child needs the secret itself, not the dump's mask
            value = raw.get_secret_value() if isinstance(raw, SecretStr) else values[name]
            text = (None if value is None else ("true" if value else "false")
                    if isinstance(value, bool) else json.dumps(value)
                    if isinstance(value, dict) else str(value))
            names = [f"MOEFLOW_ENGINE_{name.upper()}"]
            if isinstance(field.validation_alias, AliasChoices):
                names += [a for a in field.validation_alias.choices if isinstance(a, str)]
            env.update(dict.fromkeys(names, text))
        return env


class EngineSettings(EngineOptions):
    """Every limit of one engine instance: the shared options plus its identity."""

    model_path: Path
    """Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)."""
    served_model_name: str = ""
    """Name clients use in ``model``; defaults to the folder name."""
    role: Role = Role.COLOCATED
    rank: int = Field(0, ge=0)
    instance_id: str = ""
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=0, le=65535)
    group: str = ""
    """XCCL group: instances of one deployment meet in it; defaults to the served name."""
    num_expert_instances: int = Field(0, ge=0)
    """Attention and expert roles: how many expert instances (XCCL ranks expert-0..N-1)."""
    num_attention_instances: int = Field(0, ge=0)
    """Expert role: how many attention instances it serves (ranks attention-0..N-1)."""

    # -- robustness (docs/operations.md, "Engine instances") --
    drain_timeout_s: float = Field(30.0, ge=0)
    """On SIGTERM the instance drains (takes no new requests, finishes those in flight) and
    exits when they are done or after this many seconds, whichever comes first."""
    internal_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("MOEFLOW_INTERNAL_TOKEN")  # no bare INTERNAL_TOKEN
    )
    """Shared secret of the platform (env ``MOEFLOW_INTERNAL_TOKEN``): when set, every route
    but health and metrics needs it in ``x-moeflow-internal-token``, and calls to other
    instances send it (``moeflow.web.internal_auth``). Empty means unset."""

    @field_validator("internal_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        if value == "" or (isinstance(value, SecretStr) and not value.get_secret_value()):
            return None
        return value

    @property
    def internal_token_value(self) -> str | None:
        """The internal token in clear (for headers and the middleware), or None."""
        return self.internal_token.get_secret_value() if self.internal_token else None

    @model_validator(mode="after")
    def _check(self) -> EngineSettings:
        if self.role in (Role.ATTENTION, Role.EXPERT) and self.num_expert_instances < 1:
            raise ValueError(f"role {self.role} needs num_expert_instances >= 1")
        if self.role is Role.EXPERT:
            if self.num_attention_instances < 1:
                raise ValueError("role expert needs num_attention_instances >= 1")
            if self.rank >= self.num_expert_instances:
                raise ValueError(f"expert rank {self.rank} must be < num_expert_instances "
                                 f"({self.num_expert_instances})")
        if not self.model_path.is_dir():
            raise ValueError(
                f"model_path {self.model_path} is not a folder; pull it first with "
                "`moeflow models pull NAME` or pass a Hugging Face checkpoint folder"
            )
        return self

    @property
    def name(self) -> str:
        return self.served_model_name or self.model_path.name

    @property
    def xccl_group(self) -> str:
        return self.group or self.name

    @property
    def instance_name(self) -> str:
        return self.instance_id or f"{self.role}-{self.rank}"
