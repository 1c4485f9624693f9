"""`FineTune.spec`, typed and validated, and the facts the operator and the trainer share.

Contract:
- Pure and I/O-free (no torch, kopf or kubernetes), like `moeflow.domain.spec`, whose
  conventions it follows: snake_case in Python, camelCase on the wire, defaults equal to the
  CRD's (a test compares them), every failure a `SpecError` naming the field and the fix.
- The base model is a `Source` (the Model CRD's `store://`, `pvc://`, `file:///` URIs).
- `HyperParameters` is also the local CLI's configuration: `hyper_parameter_flags` renders one
  as `moeflow finetune` flags (every field, explicitly) and the CLI parses them back into an
  equal object, so a Pod and a laptop run the same training from the same numbers.
- The trainer's final word travels as the container's termination message,
  `"<Reason>: <message>"` (`termination_message`/`parse_termination_message`); reasons in
  `PERMANENT_FAILURES` are not retried (the same input would fail again).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import Field, field_validator, model_validator

from moeflow.domain import naming
from moeflow.domain.spec import Resources, Source, SpecError, parse_spec
from moeflow.domain.spec_base import SpecModel as _SpecBase

KIND = "FineTune"
PLURAL = "finetunes"
COMPONENT = "finetune"
"""`app.kubernetes.io/component` of the trainer Pods and their RBAC."""
LABEL_FINETUNE = "moeflow.dev/finetune"
LABEL_ATTEMPT = "moeflow.dev/attempt"
# "<name>-finetune-<attempt>" must fit a 63-character label value (attempt <= 10: 12 more).
MAX_FINETUNE_NAME_LENGTH = 50
DATA_SCHEMES = ("pvc", "store")
OUTPUT_SCHEMES = ("pvc", "store")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MODULE_NAME = r"^[A-Za-z0-9_.\-]+$"
_REASON = re.compile(r"^([A-Z][A-Za-z0-9]*): ?(.*)$", re.DOTALL)

# Failure reasons of the trainer (the first word of its termination message).
INVALID_DATASET = "InvalidDataset"
DATASET_NOT_FOUND = "DatasetNotFound"
MODEL_NOT_FOUND = "ModelNotFound"
INVALID_ARGUMENTS = "InvalidArguments"
CHECKPOINT_MISMATCH = "CheckpointMismatch"
TRAINING_FAILED = "TrainingFailed"
COMPLETED = "Completed"
PERMANENT_FAILURES = frozenset({INVALID_DATASET, DATASET_NOT_FOUND, MODEL_NOT_FOUND,
                                INVALID_ARGUMENTS, CHECKPOINT_MISMATCH})
EXIT_PERMANENT = 2
"""Exit code of a trainer that failed for a reason in PERMANENT_FAILURES (else 1)."""


# The base of every CR spec model (camelCase aliases, unknown fields refused, frozen), so that
# `parse_spec` reports FineTune problems exactly as it reports Model ones.
_Spec = _SpecBase


class Method(StrEnum):
    LORA_SFT = "lora-sft"


class DataFormat(StrEnum):
    AUTO = "auto"
    CHAT = "chat"
    COMPLETION = "completion"


class DType(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class ConfigMapKey(_Spec):
    name: str = Field(min_length=1)
    key: str = Field("train.jsonl", min_length=1)


def _check_uri(uri: str, schemes: tuple[str, ...], what: str, *, needs_path: bool) -> str:
    scheme, sep, rest = uri.partition("://")
    claim, _, path = rest.partition("/")
    # pvc: the claim, then (for a file) a path inside it; store: a path in the node store.
    has_path = bool(path.strip("/")) if scheme == "pvc" else bool(rest.strip("/"))
    if not sep or scheme not in schemes or not claim or (needs_path and not has_path):
        shapes = " or ".join(
            f"{s}://<claim>/<path>" if s == "pvc" else f"{s}://<path>" for s in schemes)
        raise ValueError(f"{uri!r} is not a supported {what}; fix: use {shapes}")
    if ".." in uri:  # the CRD's CEL rule says the same, in the same words
        raise ValueError(f"{uri!r}: '..' is not allowed in a {what}; fix: name the path"
                         " from the volume's root")
    return uri


class DatasetSpec(_Spec):
    """Training records (JSONL): exactly one of a ConfigMap key or a file URI
    (`pvc://<claim>/<path>.jsonl`, `store://<path>.jsonl` in the node model store)."""

    config_map: ConfigMapKey | None = None
    uri: str | None = None
    format: DataFormat = DataFormat.AUTO

    @field_validator("uri")
    @classmethod
    def _check_scheme(cls, uri: str | None) -> str | None:
        return None if uri is None else _check_uri(uri, DATA_SCHEMES, "dataset", needs_path=True)

    @model_validator(mode="after")
    def _exactly_one(self) -> DatasetSpec:
        if (self.config_map is None) == (self.uri is None):
            raise ValueError("dataset: set exactly one of configMap and uri; fix: keep the one"
                             " that holds the JSONL")
        return self


class OutputSpec(_Spec):
    """Where the adapter goes: `pvc://<claim>[/<path>]` or `store://<name>` (node store)."""

    uri: str

    @field_validator("uri")
    @classmethod
    def _check_scheme(cls, uri: str) -> str:
        return _check_uri(uri, OUTPUT_SCHEMES, "output", needs_path=False)


class HyperParameters(_Spec):
    """LoRA SFT knobs. A step is one optimizer update over `batch_size *
    gradient_accumulation_steps` records; `max_steps` > 0 overrides `epochs`."""

    lora_rank: int = Field(8, ge=1, le=1024)
    lora_alpha: int = Field(16, ge=1, le=4096)
    lora_dropout: float = Field(0.05, ge=0, le=0.9)
    target_modules: tuple[str, ...] = Field(DEFAULT_TARGET_MODULES, min_length=1)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    epochs: int = Field(1, ge=1, le=1000)
    max_steps: int = Field(0, ge=0)
    batch_size: int = Field(4, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_length: int = Field(1024, ge=16, le=131072)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    checkpoint_every: int = Field(50, ge=1)
    dtype: DType = DType.FLOAT32

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return tuple(m.strip() for m in value.split(",") if m.strip()) if isinstance(
            value, str) else value

    @field_validator("target_modules")
    @classmethod
    def _check_modules(cls, modules: tuple[str, ...]) -> tuple[str, ...]:
        bad = [m for m in modules if not re.match(_MODULE_NAME, m)]
        if bad:
            raise ValueError(f"{bad!r} are not module names; fix: use names such as q_proj,"
                             " or all-linear")
        return modules


class FineTuneSpec(_Spec):
    """`FineTune.spec`: train a LoRA adapter on a base model, write it to `output`."""

    base_model: Source
    dataset: DatasetSpec
    output: OutputSpec
    method: Method = Method.LORA_SFT
    hyper_parameters: HyperParameters = HyperParameters()
    devices: int = Field(0, ge=0, le=64)
    resources: Resources = Resources()
    backoff_limit: int = Field(2, ge=0, le=10)

    @field_validator("base_model")
    @classmethod
    def _check_base_scheme(cls, source: Source) -> Source:
        # the trainer mounts its base model; it has no Hub cache (the CRD's pattern agrees)
        if source.scheme == "hf":
            raise ValueError(f"{source.uri!r}: a FineTune's base model is mounted, not fetched;"
                             " fix: `moeflow models pull` it into the node store and use"
                             " store://<name>, or use pvc:// or file://")
        return source


def parse_finetune_spec(raw: Mapping[str, Any] | None) -> FineTuneSpec:
    return parse_spec(FineTuneSpec, raw)


def check_finetune_name(name: str) -> None:
    if len(name) > MAX_FINETUNE_NAME_LENGTH or not _DNS_LABEL.match(name):
        raise SpecError([
            f"metadata.name: {name!r} must be a DNS label of at most {MAX_FINETUNE_NAME_LENGTH}"
            " characters (lowercase letters, digits, '-', starting with a letter); fix: rename"
            " the FineTune"
        ])


def pod_name(finetune: str, attempt: int) -> str:
    return f"{finetune}-finetune-{attempt}"


def service_account_name(finetune: str) -> str:
    """The trainer's identity (ServiceAccount, Role, RoleBinding): it may patch the status of
    its own FineTune and nothing else."""
    return f"{finetune}-finetune"


def labels(finetune: str, attempt: int | None = None) -> dict[str, str]:
    result = {
        naming.LABEL_NAME: "moeflow",
        naming.LABEL_INSTANCE: finetune,
        naming.LABEL_COMPONENT: COMPONENT,
        naming.LABEL_PART_OF: "moeflow",
        naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
        LABEL_FINETUNE: finetune,
    }
    if attempt is not None:
        result[LABEL_ATTEMPT] = str(attempt)
    return result


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def hyper_parameter_flags(hp: HyperParameters) -> list[str]:
    """Every hyper-parameter as `moeflow finetune` flags (explicit, not left to defaults)."""
    argv: list[str] = []
    for field in HyperParameters.model_fields:
        value = getattr(hp, field)
        if isinstance(value, tuple):
            text = ",".join(value)
        elif isinstance(value, StrEnum):
            text = value.value
        else:
            text = repr(value) if isinstance(value, float) else str(value)
        argv += [_flag(field), text]
    return argv


def trainer_argv(spec: FineTuneSpec, *, model_path: str, data_path: str, output_dir: str,
                 report_to: str | None = None, termination_log: str | None = None
                 ) -> list[str]:
    """The trainer's command line: `moeflow finetune ...` (the local CLI, same flags)."""
    argv = ["moeflow", "finetune", "--model", model_path, "--data", data_path,
            "--output", output_dir, "--format", spec.dataset.format.value,
            "--base-model-name", spec.base_model.uri,
            *hyper_parameter_flags(spec.hyper_parameters)]
    if report_to:
        argv += ["--report-to-finetune", report_to]
    if termination_log:
        argv += ["--termination-log", termination_log]
    return argv


def termination_message(reason: str, message: str, limit: int = 4000) -> str:
    """`"<Reason>: <message>"`, cut to what the kubelet keeps (4096 bytes)."""
    text = f"{reason}: {message}"
    return text if len(text.encode()) <= limit else text.encode()[:limit].decode(
        errors="ignore")


def parse_termination_message(text: str | None) -> tuple[str | None, str]:
    """(reason, message) of a trainer's termination message; (None, text) when it is not
    one (a crash: the kubelet's log tail, or nothing)."""
    text = (text or "").strip()
    match = _REASON.match(text)
    return (match.group(1), match.group(2).strip()) if match else (None, text)
