"""Typed, validated views of the moeflow.dev custom resources' `spec`, parsed from CR dicts.

Contract:
- Pure and I/O-free; imports neither kopf nor kubernetes, so the local (no-cluster) runtime
  uses the very same validation as the operator.
- Field names are snake_case in Python and camelCase on the wire (the CRD's names).
- Defaults equal the CRD's OpenAPI defaults (a unit test compares the two), so a dict that went
  through the API server and one that did not parse to the same object.
- Every failure is a `SpecError` whose message names the field path (`spec.roles.decode...`)
  and the fix. Cross-field rules that the CRD states in CEL (`x-kubernetes-validations`) are
  checked here too, because a cluster without CEL (or the emulator) would let them through.

The Model's pieces live beside it (`spec_base`: the base model, SpecError, quantities;
`spec_source`: where the weights come from; `spec_pod`: how engine Pods are shaped) and are
re-exported here, so `moeflow.domain.spec` stays the one import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import Field, ValidationError, ValidationInfo, model_validator

from moeflow.domain.roles import ROLES_BY_MODE, Mode, Role
from moeflow.domain.spec_base import QUANTITY_PATTERN as QUANTITY_PATTERN
from moeflow.domain.spec_base import SpecError as SpecError
from moeflow.domain.spec_base import SpecModel as SpecModel
from moeflow.domain.spec_base import quantity_bytes as quantity_bytes
from moeflow.domain.spec_pod import ENGINE_CONTAINER as ENGINE_CONTAINER
from moeflow.domain.spec_pod import OWNED_ENGINE_CONTAINER_FIELDS as OWNED_ENGINE_CONTAINER_FIELDS
from moeflow.domain.spec_pod import OWNED_POD_FIELDS as OWNED_POD_FIELDS
from moeflow.domain.spec_pod import RESERVED_ENV as RESERVED_ENV
from moeflow.domain.spec_pod import DType as DType
from moeflow.domain.spec_pod import EngineArgs as EngineArgs
from moeflow.domain.spec_pod import EnvVar as EnvVar
from moeflow.domain.spec_pod import PodTemplateMetadata as PodTemplateMetadata
from moeflow.domain.spec_pod import PodTemplateOverlay as PodTemplateOverlay
from moeflow.domain.spec_pod import Resources as Resources
from moeflow.domain.spec_pod import TaintEffect as TaintEffect
from moeflow.domain.spec_pod import Toleration as Toleration
from moeflow.domain.spec_pod import TolerationOperator as TolerationOperator
from moeflow.domain.spec_source import HUB_ENV as HUB_ENV
from moeflow.domain.spec_source import SOURCE_SCHEMES as SOURCE_SCHEMES
from moeflow.domain.spec_source import TOKEN_ENV as TOKEN_ENV
from moeflow.domain.spec_source import HubCache as HubCache
from moeflow.domain.spec_source import HubSource as HubSource
from moeflow.domain.spec_source import SecretKeyRef as SecretKeyRef
from moeflow.domain.spec_source import Source as Source


class TransportKind(StrEnum):
    SHM = "shm"
    REDIS = "redis"


class CompletionApi(StrEnum):
    COMPLETIONS = "completions"
    CHAT_COMPLETIONS = "chat.completions"


# 40 leaves room for the longest child name, "<model>-attention-<rank>", in a 63-char DNS label.
MAX_MODEL_NAME_LENGTH = 40
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
class RoleSpec(SpecModel):
    """Replicas of one role. `replicas` is the desired count; min/max bound the autoscaler."""

    replicas: int = Field(1, ge=0)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> RoleSpec:
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) must be <= maxReplicas ({self.max_replicas});"
                " fix: lower minReplicas or raise maxReplicas"
            )
        if self.replicas < self.min_replicas:
            raise ValueError(
                f"replicas ({self.replicas}) must be >= minReplicas ({self.min_replicas});"
                " fix: raise replicas or lower minReplicas"
            )
        if self.max_replicas is not None and self.replicas > self.max_replicas:
            raise ValueError(
                f"replicas ({self.replicas}) must be <= maxReplicas ({self.max_replicas});"
                " fix: lower replicas or raise maxReplicas"
            )
        return self


class RedisPasswordRef(SpecModel):
    """The key of a Secret in the Model's namespace that holds the Redis password."""

    name: str = Field(min_length=1, max_length=253)
    key: str = Field("password", min_length=1)


class Transport(SpecModel):
    """XCCL backend between instances. Unset kind: shm when colocated, redis otherwise."""

    kind: TransportKind | None = None
    redis_url: str | None = Field(None, pattern=r"^rediss?://.+")
    redis_password_secret_ref: RedisPasswordRef | None = None
    """Engines get it as MOEFLOW_REDIS_PASSWORD (secretKeyRef), so the URL needs none."""


class GatewaySpec(SpecModel):
    replicas: int = Field(1, ge=0)


class OpenAISidecar(SpecModel):
    """An OpenAI-speaking front in every engine Pod, for a Gateway API Inference Extension
    `InferencePool` (docs/inference-extension.md): the MoEFlow gateway with this Pod's engine
    as its only instance, on `port`. Engines themselves speak only the internal /v1/generate."""

    port: int = Field(8000, ge=1, le=65535)
    """The OpenAI port (`openai`), the one the InferencePool's targetPorts names; not the
    engine's own port (8001)."""


class Slo(SpecModel):
    ttft_ms: int | None = Field(None, ge=1)
    tpot_ms: int | None = Field(None, ge=1)


class ModelSpec(SpecModel):
    """`Model.spec`: what to serve and how."""

    source: Source
    mode: Mode = Mode.COLOCATED
    roles: dict[Role, RoleSpec] = Field(default_factory=dict)
    devices_per_instance: int = Field(0, ge=0, le=64)
    resources: Resources = Resources()
    transport: Transport = Transport()
    gateway: GatewaySpec = GatewaySpec()
    slo: Slo = Slo()
    scale_to_zero_after_seconds: int = Field(0, ge=0)
    warm_pool_size: int = Field(0, ge=0)
    dram_preload: bool = False
    """Keep the weights in every node's DRAM model store (pinned by `moeflow store agent`)
    and have engines map them from there; see docs/coldstart.md."""
    image: str | None = Field(None, min_length=1)
    """Engine image; unset: the operator's image."""
    engine: EngineArgs = EngineArgs()
    env: list[EnvVar] = Field(default_factory=list)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    pod_template: PodTemplateOverlay = PodTemplateOverlay()
    openai_sidecar: OpenAISidecar | None = None

    @model_validator(mode="after")
    def _check_cross_fields(self, info: ValidationInfo) -> ModelSpec:
        # context {"single_host": True}: the local runtime, where every role shares one host
        single_host = bool((info.context or {}).get("single_host"))
        allowed = ROLES_BY_MODE[self.mode]
        for role in self.roles:
            if role not in allowed:
                raise ValueError(
                    f"roles.{role}: role {role.value!r} is not used in mode {self.mode.value!r}"
                    f" (its roles: {', '.join(allowed)}); fix: remove spec.roles.{role}"
                    " or change spec.mode"
                )
        engine_env = self.engine.engine_env()
        for var in self.env:
            if var.name in RESERVED_ENV or var.name in engine_env:
                raise ValueError(
                    f"env: {var.name} is set by the operator (or by spec.engine); fix: remove it"
                    " from spec.env (engine settings go in spec.engine)")
            if var.name in HUB_ENV and self.source.scheme == "hf":
                raise ValueError(
                    f"env: {var.name} is set by the operator for an hf:// source; fix: remove it"
                    " from spec.env and set spec.source.hub instead")
            if var.name in TOKEN_ENV and var.value is not None:
                raise ValueError(
                    f"env: {var.name} must not be a literal token in the spec; fix: put it in a"
                    " Secret and name it in spec.source.hub.tokenSecretRef (or env valueFrom)")
        if self.openai_sidecar is not None and self.mode is not Mode.COLOCATED:
            raise ValueError(
                f"openaiSidecar serves one engine on its own, which mode {self.mode.value!r}"
                " splits over several roles; fix: remove spec.openaiSidecar or use mode"
                " colocated (route split Models through their gateway)")
        if self.transport_kind is TransportKind.REDIS and not self.transport.redis_url:
            raise ValueError(
                "transport.redisUrl: is required when the transport is redis (the default for"
                " disaggregated modes); fix: set spec.transport.redisUrl to redis://host:6379/0"
            )
        if (self.transport.redis_password_secret_ref is not None
                and self.transport_kind is not TransportKind.REDIS):
            raise ValueError(
                "transport.redisPasswordSecretRef: only the redis transport uses it, and this"
                f" Model's transport is {self.transport_kind.value}; fix: remove it")
        if (
            self.mode is not Mode.COLOCATED
            and self.transport.kind is TransportKind.SHM
            and not single_host
        ):
            raise ValueError(
                f"transport.kind: shm only connects processes in one pod, but mode"
                f" {self.mode.value!r} runs each role in its own pods; fix: set"
                " spec.transport.kind: redis and spec.transport.redisUrl"
            )
        return self

    @property
    def role_names(self) -> tuple[Role, ...]:
        return ROLES_BY_MODE[self.mode]

    def role(self, role: Role) -> RoleSpec:
        """The replicas of `role`; a role of the mode that the spec leaves out gets defaults."""
        return self.roles.get(role, RoleSpec())

    @property
    def transport_kind(self) -> TransportKind:
        if self.transport.kind is not None:
            return self.transport.kind
        return TransportKind.SHM if self.mode is Mode.COLOCATED else TransportKind.REDIS


class TaskTemplate(SpecModel):
    """What every EngineInstance of a RoleGroup runs; copied from the Model by the operator."""

    image: str = Field(min_length=1)
    source: Source
    model_path: str = Field(min_length=1)
    port: int = Field(8001, ge=1, le=65535)
    devices_per_instance: int = Field(0, ge=0)
    resources: Resources = Resources()
    transport: Transport = Transport()
    expert_instances: int = Field(0, ge=0)
    """Attention/expert split: the size of the expert fleet (both roles need it)."""
    attention_instances: int = Field(0, ge=0)
    """Attention/expert split: the attention instances an expert instance serves."""
    dram_preload: bool = False
    """The Model's `dramPreload`: engines mount the node DRAM store and map from it."""
    engine: EngineArgs = EngineArgs()
    env: list[EnvVar] = Field(default_factory=list)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    pod_template: PodTemplateOverlay = PodTemplateOverlay()
    openai_sidecar: OpenAISidecar | None = None
    """The Model's `openaiSidecar`: engine Pods get the OpenAI front container."""

    @property
    def customizes_pod(self) -> bool:
        """True when the Model shapes its engine Pods beyond what a warm Pod can match."""
        return bool(self.engine.engine_env() or self.env or self.node_selector
                    or self.openai_sidecar is not None
                    or self.tolerations or self.affinity or self.pod_template.spec
                    or self.pod_template.metadata.labels
                    or self.pod_template.metadata.annotations)


class JobSpec(SpecModel):
    """`Job.spec`: one role group (the paper's TE group) of one Model."""

    model: str = Field(min_length=1)
    role: Role
    replicas: int = Field(ge=0)
    template: TaskTemplate


class TaskSpec(SpecModel):
    """`Task.spec`: one engine instance."""

    model: str = Field(min_length=1)
    role_group: str = Field(min_length=1)
    """The RoleGroup this instance belongs to."""
    role: Role
    rank: int = Field(ge=0)
    template: TaskTemplate


class ConfigMapKeyRef(SpecModel):
    name: str = Field(min_length=1)
    key: str = "prompts.jsonl"


class OutputRef(SpecModel):
    name: str | None = None
    key: str = "results.jsonl"


class RequestSpec(SpecModel):
    """`Request.spec`: a batch of prompts (JSONL in a ConfigMap) against one Model."""

    model: str = Field(min_length=1)
    input: ConfigMapKeyRef
    output: OutputRef = OutputRef()
    api: CompletionApi = CompletionApi.COMPLETIONS
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    parallelism: int = Field(4, ge=1, le=256)
    endpoint: str | None = Field(None, pattern=r"^https?://.+")


class WarmPoolSpec(SpecModel):
    size: int = Field(0, ge=0)
    devices_per_instance: int = Field(0, ge=0)
    image: str | None = None


_SpecT = TypeVar("_SpecT", bound=SpecModel)


def parse_spec(cls: type[_SpecT], raw: Mapping[str, Any] | None, *, prefix: str = "spec") -> _SpecT:
    """Validate a CR's spec dict into `cls`, or raise SpecError naming each bad field."""
    try:
        return cls.model_validate(dict(raw or {}))
    except ValidationError as e:
        raise SpecError([_describe(prefix, err) for err in e.errors()]) from None


def parse_model_spec(raw: Mapping[str, Any] | None) -> ModelSpec:
    return parse_spec(ModelSpec, raw)


def check_model_name(name: str) -> None:
    """Model names become parts of DNS labels (Pod hostnames, Services); reject those that
    would overflow or be invalid there."""
    if len(name) > MAX_MODEL_NAME_LENGTH or not _DNS_LABEL.match(name):
        raise SpecError([
            f"metadata.name: {name!r} must be a DNS label of at most {MAX_MODEL_NAME_LENGTH}"
            " characters (lowercase letters, digits, '-', starting with a letter); fix: rename"
            " the Model"
        ])


def _describe(prefix: str, err: Mapping[str, Any]) -> str:
    path = ".".join([prefix, *(str(p) for p in err["loc"])])
    kind = err["type"]
    if kind == "value_error":
        # Our own validators already say what to do; pydantic prefixes "Value error, ".
        message = str(err["msg"]).removeprefix("Value error, ")
        if not err["loc"]:  # a cross-field rule: the message starts with "<field>: "
            return f"{prefix}.{message}"
        return f"{path}: {message}"
    if kind == "missing":
        return f"{path}: is required; fix: set it (see `kubectl explain` for the field)"
    if kind == "extra_forbidden":
        return f"{path}: unknown field; fix: remove it or correct its spelling"
    if kind == "enum":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{path}: {err['input']!r} is not allowed; fix: use one of {expected}"
    return f"{path}: {err['msg']} (got {err.get('input')!r}); fix: correct the value"
