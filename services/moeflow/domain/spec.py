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
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from moeflow.domain.roles import ROLES_BY_MODE, Mode, Role


class TransportKind(StrEnum):
    SHM = "shm"
    REDIS = "redis"


class CompletionApi(StrEnum):
    COMPLETIONS = "completions"
    CHAT_COMPLETIONS = "chat.completions"


# 40 leaves room for the longest child name, "<model>-attention-<rank>", in a 63-char DNS label.
MAX_MODEL_NAME_LENGTH = 40
SOURCE_SCHEMES = ("store", "pvc", "file", "hf")
# hf://org/name[@revision]: a repo id as huggingface_hub takes it (the CRD's pattern agrees)
_HUB_URI = re.compile(r"^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[^@\s]+)?$")
HUB_ENV = frozenset({"HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME", "HF_HUB_CACHE"})
"""Variables the operator sets on engines of an hf:// Model (from `spec.source.hub`)."""
TOKEN_ENV = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})
"""Never a literal `value` in `spec.env`: a token comes from a Secret."""
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"


class SpecError(ValueError):
    """An invalid spec. `problems` holds one "field: what is wrong; fix: what to do" per issue."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems) if len(problems) == 1 else " | ".join(problems))
        self.problems = problems


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class RoleSpec(_Spec):
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


class SecretKeyRef(_Spec):
    """One key of a Secret in the Model's namespace (read by the kubelet, never by us)."""

    name: str = Field(min_length=1)
    key: str = Field("HF_TOKEN", min_length=1)


class HubCache(_Spec):
    """Where engines keep the Hub download (HF_HOME): a PersistentVolumeClaim by name, shared
    by the Model's engines and kept across restarts, or else an emptyDir per Pod."""

    claim_name: str | None = Field(None, min_length=1)
    size_limit: str | None = Field(None, pattern=_QUANTITY)
    """emptyDir only: its sizeLimit."""

    @model_validator(mode="after")
    def _check_one_kind(self) -> HubCache:
        if self.claim_name and self.size_limit:
            raise ValueError("sizeLimit applies to the emptyDir cache only; fix: drop sizeLimit"
                             " (the claim's own size bounds it) or claimName")
        return self


class HubSource(_Spec):
    """How engines reach the Hub for an `hf://` source (huggingface_hub's variables)."""

    endpoint: str | None = Field(None, pattern=r"^https?://.+")
    """HF_ENDPOINT (a mirror or a private hub); unset: huggingface.co."""
    offline: bool = False
    """HF_HUB_OFFLINE=1: only the cache, which must then be a claim that holds the model."""
    token_secret_ref: SecretKeyRef | None = None
    """HF_TOKEN from this Secret key (gated or private repos)."""
    cache: HubCache = HubCache()

    @model_validator(mode="after")
    def _check_offline(self) -> HubSource:
        if self.offline and not self.cache.claim_name:
            raise ValueError("offline needs cache.claimName: an offline engine reads only its"
                             " cache, and an emptyDir starts empty; fix: set cache.claimName to a"
                             " PVC holding the model, or drop offline")
        return self


class Source(_Spec):
    """Where the weights are. `store://<name>`: the node model store (host path);
    `pvc://<claim>[/<sub/path>]`: a PersistentVolumeClaim; `file:///<dir>`: a node directory;
    `hf://org/name[@revision]`: the Hugging Face Hub, fetched by each engine through
    huggingface_hub (KServe's `storageUri: hf://` habit), configured by `hub`."""

    uri: str
    architecture: str | None = None
    hub: HubSource | None = None

    @field_validator("uri")
    @classmethod
    def _check_scheme(cls, uri: str) -> str:
        scheme, sep, rest = uri.partition("://")
        if not sep or scheme not in SOURCE_SCHEMES or not rest:
            raise ValueError(
                f"{uri!r} is not a supported source; fix: use store://<name>,"
                " pvc://<claim>[/<path>], file:///<dir> or hf://<org>/<name>[@<revision>]"
            )
        if scheme == "hf" and (not _HUB_URI.match(uri) or ".." in uri):
            raise ValueError(f"{uri!r} is not a Hub model; fix: write hf://<org>/<name> or"
                             " hf://<org>/<name>@<revision>")
        return uri

    @model_validator(mode="after")
    def _check_hub(self) -> Source:
        if self.hub is not None and self.scheme != "hf":
            raise ValueError(f"hub applies to hf:// sources only, not {self.uri!r}; fix:"
                             " drop spec.source.hub or use an hf:// uri")
        return self

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    @property
    def location(self) -> str:
        return self.uri.split("://", 1)[1]

    @property
    def hub_settings(self) -> HubSource:
        """`hub`, or its defaults (an hf:// source without `hub`)."""
        return self.hub or HubSource()


class RedisPasswordRef(_Spec):
    """The key of a Secret in the Model's namespace that holds the Redis password."""

    name: str = Field(min_length=1, max_length=253)
    key: str = Field("password", min_length=1)


class Transport(_Spec):
    """XCCL backend between instances. Unset kind: shm when colocated, redis otherwise."""

    kind: TransportKind | None = None
    redis_url: str | None = Field(None, pattern=r"^rediss?://.+")
    redis_password_secret_ref: RedisPasswordRef | None = None
    """Engines get it as MOEFLOW_REDIS_PASSWORD (secretKeyRef), so the URL needs none."""


class Resources(_Spec):
    """Per engine instance; requests equal limits. Quantities as in Kubernetes ("2", "500m")."""

    cpu: str | None = Field(None, pattern=_QUANTITY)
    memory: str | None = Field(None, pattern=_QUANTITY)

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _number_as_quantity(cls, value: object) -> object:
        # YAML `cpu: 2` arrives as an int; the CRD allows int-or-string like Kubernetes does.
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        return str(value) if is_number else value


_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BYTES = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")


_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""A LoRA adapter's name, as the engine accepts it (``engine.adapter_store``)."""


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("512Mi", "2G", "1073741824") as bytes; ValueError else."""
    match = _BYTES.match(quantity)
    if match is None:
        raise ValueError(f"{quantity!r} is not a byte quantity; fix: write e.g. 512Mi or 2Gi")
    number, suffix = int(match.group(1)), match.group(2) or ""
    return number * (_BINARY_SUFFIXES.get(suffix) or _DECIMAL_SUFFIXES[suffix])


class DType(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class EngineArgs(_Spec):
    """Engine arguments shared by every instance of the Model (vLLM's names where one exists).
    Unset fields keep the engine's defaults (docs/configuration.md). Each set field becomes one
    `MOEFLOW_ENGINE_<NAME>` variable of the engine container (`engine_env`)."""

    dtype: DType | None = None
    kv_cache_memory: str | None = None
    """Memory of the paged KV cache per instance, a byte quantity ("2Gi")."""
    max_model_len: int | None = Field(None, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=16)
    max_num_waiting: int | None = Field(None, ge=1)
    block_size: int | None = Field(None, ge=1, le=1024)
    enable_prefix_caching: bool | None = None
    num_threads: int | None = Field(None, ge=1, le=1024)
    """torch threads; unset: the container's CPU limit (cgroup), never the node's cores."""
    lora_adapters: dict[str, str] | None = None
    """PEFT LoRA adapters served beside the base model: name -> absolute folder in the engine
    container (a store:// model sees the node store under its model mount, /models)."""
    lora_memory: str | None = None
    """Memory for resident adapters per instance, a byte quantity (engine default 256Mi)."""

    @field_validator("lora_adapters")
    @classmethod
    def _check_adapters(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name, path in (value or {}).items():
            if not _ADAPTER_NAME.match(name):
                raise ValueError(f"adapter name {name!r}: 1-128 letters, digits, '.', '_' or "
                                 "'-', starting with a letter or digit")
            if not path.startswith("/"):
                raise ValueError(f"adapter {name!r}: {path!r} is not an absolute folder of the "
                                 "engine container; fix: e.g. /models/<adapter>")
        return value

    @field_validator("lora_memory")
    @classmethod
    def _check_lora_memory(cls, value: str | None) -> str | None:
        if value is not None:
            quantity_bytes(value)
        return value

    @field_validator("kv_cache_memory")
    @classmethod
    def _check_kv(cls, value: str | None) -> str | None:
        if value is not None and quantity_bytes(value) < 4096:
            raise ValueError(f"{value!r} is below 4Ki; fix: give the KV cache at least 4Ki")
        return value

    @model_validator(mode="after")
    def _check_budget(self) -> EngineArgs:
        if (self.max_num_batched_tokens is not None and self.max_num_seqs is not None
                and self.max_num_batched_tokens < self.max_num_seqs):
            raise ValueError(
                f"maxNumBatchedTokens ({self.max_num_batched_tokens}) must be >= maxNumSeqs"
                f" ({self.max_num_seqs}): every running sequence needs a token per step; fix:"
                " raise maxNumBatchedTokens or lower maxNumSeqs")
        return self

    def engine_env(self) -> dict[str, str]:
        """`MOEFLOW_ENGINE_*` variable -> value for each set field (EngineOptions reads them)."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "kv_cache_memory":
                env["MOEFLOW_ENGINE_KV_CACHE_BYTES"] = str(quantity_bytes(value))
            elif name == "lora_memory":
                env["MOEFLOW_ENGINE_LORA_MEMORY_BYTES"] = str(quantity_bytes(value))
            elif name == "lora_adapters":
                env["MOEFLOW_ENGINE_LORA_ADAPTERS"] = json.dumps(value, sort_keys=True)
            elif isinstance(value, bool):
                env[f"MOEFLOW_ENGINE_{name.upper()}"] = "true" if value else "false"
            else:
                env[f"MOEFLOW_ENGINE_{name.upper()}"] = str(value)
        return env


RESERVED_ENV = frozenset({
    "MOEFLOW_TRANSPORT", "MOEFLOW_TASK", "MOEFLOW_NAMESPACE", "MOEFLOW_POD_IP",
    "MOEFLOW_ENGINE_DRAIN_TIMEOUT_S", "MOEFLOW_INTERNAL_TOKEN", "MOEFLOW_REDIS_URL",
    "MOEFLOW_REDIS_PASSWORD",
})
"""Variables the operator sets on every engine container; `spec.env` may not override them."""


class EnvVar(_Spec):
    """A container variable, as in a Pod: a literal `value` or a `valueFrom` source."""

    name: str = Field(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = None
    value_from: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_one_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"env {self.name}: value and valueFrom are exclusive; fix: keep one")
        return self


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(_Spec):
    """As in a Pod's `tolerations`."""

    key: str | None = None
    operator: TolerationOperator | None = None
    value: str | None = None
    effect: TaintEffect | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _check_exists(self) -> Toleration:
        if self.operator is TolerationOperator.EXISTS and self.value:
            raise ValueError("toleration: operator Exists takes no value; fix: drop value")
        return self


class PodTemplateMetadata(_Spec):
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


# What the operator owns in an engine Pod: names, DNS identity and how the engine starts.
OWNED_POD_FIELDS = frozenset({"hostname", "subdomain", "restartPolicy"})
OWNED_ENGINE_CONTAINER_FIELDS = frozenset({"command", "args", "image", "ports"})
ENGINE_CONTAINER = "engine"


class PodTemplateOverlay(_Spec):
    """Merged over every engine Pod the operator builds (`build_engine.overlay_pod`): labels
    and annotations are added (the operator's keys win), `spec` objects merge recursively,
    lists are appended (`containers` merge by name: a container named `engine` adds to the
    engine container, others run beside it), other values replace the operator's."""

    metadata: PodTemplateMetadata = PodTemplateMetadata()
    spec: dict[str, Any] = Field(default_factory=dict)

    @field_validator("spec")
    @classmethod
    def _check_owned(cls, spec: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(OWNED_POD_FIELDS & set(spec))
        if owned:
            raise ValueError(f"spec.{owned[0]} is set by the operator; fix: remove it")
        for container in spec.get("containers") or []:
            if not isinstance(container, dict) or not container.get("name"):
                raise ValueError("spec.containers: every container needs a name; fix: name it")
            if container["name"] == ENGINE_CONTAINER:
                clash = sorted(OWNED_ENGINE_CONTAINER_FIELDS & set(container))
                if clash:
                    raise ValueError(
                        f"spec.containers[engine].{clash[0]} is set by the operator; fix:"
                        " remove it (the image is spec.image, engine flags spec.engine)")
        return spec


class GatewaySpec(_Spec):
    replicas: int = Field(1, ge=0)


class OpenAISidecar(_Spec):
    """An OpenAI-speaking front in every engine Pod, for a Gateway API Inference Extension
    `InferencePool` (docs/inference-extension.md): the MoEFlow gateway with this Pod's engine
    as its only instance, on `port`. Engines themselves speak only the internal /v1/generate."""

    port: int = Field(8000, ge=1, le=65535)
    """The OpenAI port (`openai`), the one the InferencePool's targetPorts names; not the
    engine's own port (8001)."""


class Slo(_Spec):
    ttft_ms: int | None = Field(None, ge=1)
    tpot_ms: int | None = Field(None, ge=1)


class ModelSpec(_Spec):
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


class TaskTemplate(_Spec):
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


class JobSpec(_Spec):
    """`Job.spec`: one role group (the paper's TE group) of one Model."""

    model: str = Field(min_length=1)
    role: Role
    replicas: int = Field(ge=0)
    template: TaskTemplate


class TaskSpec(_Spec):
    """`Task.spec`: one engine instance."""

    model: str = Field(min_length=1)
    role_group: str = Field(min_length=1)
    """The RoleGroup this instance belongs to."""
    role: Role
    rank: int = Field(ge=0)
    template: TaskTemplate


class ConfigMapKeyRef(_Spec):
    name: str = Field(min_length=1)
    key: str = "prompts.jsonl"


class OutputRef(_Spec):
    name: str | None = None
    key: str = "results.jsonl"


class RequestSpec(_Spec):
    """`Request.spec`: a batch of prompts (JSONL in a ConfigMap) against one Model."""

    model: str = Field(min_length=1)
    input: ConfigMapKeyRef
    output: OutputRef = OutputRef()
    api: CompletionApi = CompletionApi.COMPLETIONS
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    parallelism: int = Field(4, ge=1, le=256)
    endpoint: str | None = Field(None, pattern=r"^https?://.+")


class WarmPoolSpec(_Spec):
    size: int = Field(0, ge=0)
    devices_per_instance: int = Field(0, ge=0)
    image: str | None = None


_SpecT = TypeVar("_SpecT", bound=_Spec)


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
