"""How a Model's engine Pods are shaped: resources, engine arguments, environment,
tolerations and the pod-template overlay (`spec.resources`, `spec.engine`, `spec.env`, ...)."""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Any

from pydantic import Field, field_validator, model_validator

from moeflow.domain.spec_base import QUANTITY_PATTERN, SpecModel, quantity_bytes


class Resources(SpecModel):
    """Per engine instance; requests equal limits. Quantities as in Kubernetes ("2", "500m")."""

    cpu: str | None = Field(None, pattern=QUANTITY_PATTERN)
    memory: str | None = Field(None, pattern=QUANTITY_PATTERN)

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _number_as_quantity(cls, value: object) -> object:
        # YAML `cpu: 2` arrives as an int; the CRD allows int-or-string like Kubernetes does.
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        return str(value) if is_number else value


_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""A LoRA adapter's name, as the engine accepts it (``engine.adapter_store``)."""


class DType(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class EngineArgs(SpecModel):
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


class EnvVar(SpecModel):
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


class Toleration(SpecModel):
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


class PodTemplateMetadata(SpecModel):
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


# What the operator owns in an engine Pod: names, DNS identity and how the engine starts.
OWNED_POD_FIELDS = frozenset({"hostname", "subdomain", "restartPolicy"})
OWNED_ENGINE_CONTAINER_FIELDS = frozenset({"command", "args", "image", "ports"})
ENGINE_CONTAINER = "engine"


class PodTemplateOverlay(SpecModel):
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
