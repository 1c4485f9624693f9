"""How `moeflow` flags become settings: every flag defaults to "not given" and sets one
field ("section.field") of a typed settings class only when given, so the precedence is flag >
environment > the settings class's default, and ``--help`` names the default and the variables.
The flag groups shared by several subcommands live here too."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TypeVar

from pydantic import AliasChoices, ValidationError
from pydantic_settings import BaseSettings

from moeflow.domain.spec import quantity_bytes
from moeflow.engine.config import EngineSettings
from moeflow.gateway.settings import GatewaySettings
from moeflow.runtime.settings import (
    AutoscalingSettings,
    LocalPlatformSettings,
    SupervisionSettings,
)

SECTIONS: dict[str, type[BaseSettings]] = {
    "engine": EngineSettings,
    "gateway": GatewaySettings,
    "up": LocalPlatformSettings,
    "autoscaling": AutoscalingSettings,
    "supervision": SupervisionSettings,
}
"""Flag destinations are ``section.field``: the field of this settings class they set."""


_MIB = 1024 * 1024


_S = TypeVar("_S", bound=BaseSettings)


class InvalidSettings(Exception):
    """Flags or environment that do not make valid settings (exit code 2)."""


class UsageError(Exception):
    """Wrong input the user can fix: printed as one line ``moeflow CMD: error: ...``, exit 2."""


def env_default(var: str, default: Any, cast: Any = str) -> Any:
    """The default of a flag that has no settings class: ``var`` from the environment when set
    (converted with ``cast``), else ``default`` (precedence flag > env > default)."""
    raw = os.environ.get(var, "")
    if raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise UsageError(f"{var}={raw!r} is not a valid value") from None


def env_help(text: str, var: str) -> str:
    return f"{text} (default: %(default)s; env {var})"


def env_names(section: str, field: str) -> list[str]:
    """The environment variables that set ``field`` of a section's settings."""
    cls = SECTIONS[section]
    alias = cls.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return [a for a in alias.choices if isinstance(a, str) and a.startswith("MOEFLOW_")]
    return [f"{cls.model_config.get('env_prefix', '')}{field}".upper()]


def flag(parser: Any, *names: str, to: str, help: str = "", shown_default: str | None = None,
          **kwargs: Any) -> None:
    """A flag that sets ``to`` ("section.field") when given; else the environment or the
    settings' default applies (both named in the help)."""
    section, field = to.split(".")
    default = SECTIONS[section].model_fields[field].default
    shown = shown_default if shown_default is not None else (
        "unset" if default is None else repr(default) if isinstance(default, str) else default)
    where = f"[default {shown}; env {' or '.join(env_names(section, field))}]"
    if "choices" not in kwargs and kwargs.get("action") != "store_const":
        kwargs.setdefault("metavar", field.upper())
    parser.add_argument(*names, dest=to, default=None,
                        help=f"{help} {where}" if help else where, **kwargs)


def given(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The flags of ``section`` that were given on the command line, by field."""
    prefix = f"{section}."
    return {k.removeprefix(prefix): v for k, v in vars(args).items()
            if k.startswith(prefix) and v is not None}


def build_settings(cls: type[_S], **values: Any) -> _S:
    try:
        return cls(**values)
    except ValidationError as exc:
        raise InvalidSettings(validation_line(exc)) from None


def validation_line(exc: ValidationError) -> str:
    """pydantic's multi-line report as one line: ``field: problem (got X); ...``."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "settings"
        got = "" if "input" not in error or isinstance(error["input"], dict) else (
            f" (got {error['input']!r})")
        parts.append(f"{where}: {error['msg']}{got}")
    return "; ".join(parts)


def mib(text: str) -> int:
    return int(text) * _MIB


def quantity(text: str) -> int:
    """A Kubernetes byte quantity ("2Gi") in bytes, as the Model's kvCacheMemory is read."""
    try:
        return quantity_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """``EngineOptions``: what every instance of a deployment shares."""
    flag(p, "--dtype", to="engine.dtype", choices=["float32", "bfloat16"])
    flag(p, "--num-threads", to="engine.num_threads", type=int,
          help="torch threads (0: the container's CPU limit, else every core)")
    flag(p, "--bind-threads", to="engine.bind_threads", action="store_const", const=True,
          help="pin the compute threads one per CPU (as vLLM-CPU does)", shown_default="off")
    flag(p, "--kv-cache-mb", to="engine.kv_cache_bytes", type=mib, metavar="MIB",
          help="KV-cache memory in MiB", shown_default="512")
    flag(p, "--kv-cache-memory", to="engine.kv_cache_bytes", type=quantity,
          metavar="QUANTITY", help="KV-cache memory as a Model's spec.engine.kvCacheMemory "
          "says it (2Gi, 512Mi, 1G)", shown_default="512Mi")
    flag(p, "--block-size", to="engine.block_size", type=int, help="tokens per KV block")
    flag(p, "--max-model-len", to="engine.max_model_len", type=int,
          help="context length (0: model's)")
    flag(p, "--max-num-seqs", to="engine.max_num_seqs", type=int)
    flag(p, "--max-num-batched-tokens", to="engine.max_num_batched_tokens", type=int)
    flag(p, "--max-num-waiting", to="engine.max_num_waiting", type=int)
    flag(p, "--no-prefix-caching", to="engine.enable_prefix_caching", action="store_const",
          const=False, help="turn the prefix cache off", shown_default="on")
    flag(p, "--enable-prefix-caching", to="engine.enable_prefix_caching",
          action="store_const", const=True, help="turn the prefix cache on (over the variable)",
          shown_default="on")
    flag(p, "--transport", to="engine.transport", choices=["shm", "redis"],
          help="XCCL backend between instances (KV transfer, expert dispatch)")
    flag(p, "--redis-url", to="engine.redis_url",
          help="Redis for --transport redis (moeflow up starts one if not given)")
    flag(p, "--num-micro-batches", to="engine.num_micro_batches", type=int,
          help="attention role: micro-batches per step (overlap with the experts)")
    flag(p, "--micro-batch-min-tokens", to="engine.micro_batch_min_tokens", type=int,
          help="attention role: split a step only if each micro-batch gets this many tokens")
    flag(p, "--ae-spin-us", to="engine.ae_spin_us", type=int,
          help="attention/expert roles, shm: exchange on polled rings, spinning this long (0: "
          "datagrams)")
    flag(p, "--expert-timeout-s", to="engine.expert_timeout_s", type=float,
          help="attention role: wait this long for an expert instance's answer")
    flag(p, "--model-store", to="engine.model_store", type=Path,
          help="node model store (DRAM pre-load), e.g. /dev/shm/moeflow-store")
    flag(p, "--lora", "--lora-adapters", to="engine.lora_adapters", action="append",
          metavar="NAME=PATH",
          help="serve the PEFT LoRA adapter in folder PATH as model NAME (repeatable)",
          shown_default="none")
    flag(p, "--lora-memory-mb", to="engine.lora_memory_bytes", type=mib, metavar="MIB",
          help="memory for resident LoRA adapters; idle ones are evicted past it (LRU)",
          shown_default="256")
    flag(p, "--lora-memory", to="engine.lora_memory_bytes", type=quantity,
          metavar="QUANTITY", help="--lora-memory-mb as a Model's spec.engine.loraMemory says "
          "it (1Gi, 256Mi)", shown_default="256Mi")


def add_autoscaling_flags(p: argparse.ArgumentParser) -> None:
    """`moeflow up` autoscaling (moeflow.runtime.scaler); off unless one of the first three is
    given, so a fixed --instances stays the default."""
    g = p.add_argument_group("autoscaling (off unless --min/--max-replicas or --idle-window-s)")
    flag(g, "--min-replicas", to="autoscaling.min_replicas", type=int,
          help="fewest engine instances; 0 allows scale to zero (when on: 1)")
    flag(g, "--max-replicas", to="autoscaling.max_replicas", type=int,
          help="most engine instances (when on: --instances)")
    flag(g, "--idle-window-s", to="autoscaling.idle_window_s", type=float,
          help="no request for this long: scale to --min-replicas (when on: 300)")
    flag(g, "--max-waiting-for-scale-up", to="gateway.max_waiting_for_scale_up", type=int,
          help="requests held while the model scales up from zero; past it, 429")
    flag(g, "--slo-ttft-ms", to="autoscaling.slo_ttft_ms", type=float,
          help="scale up when the recent p90 time to first token is above this")
    flag(g, "--slo-tpot-ms", to="autoscaling.slo_tpot_ms", type=float,
          help="scale up when the recent p90 time per output token is above this")
    flag(g, "--scale-up-timeout-s", to="gateway.scale_up_timeout_s", type=float,
          help="longest a request waits for a scale-up from zero; then 503")


def add_supervision_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("supervision (dead processes are restarted on their port)")
    flag(g, "--max-start-failures", to="supervision.max_start_failures", type=int,
          help="consecutive failed starts of one process before moeflow up gives up")
    flag(g, "--engine-start-timeout-s", to="supervision.engine_start_timeout_s", type=float,
          help="longest an engine may take to answer /health")


def add_gateway_flags(p: argparse.ArgumentParser) -> None:
    flag(p, "--host", to="gateway.host")
    flag(p, "--port", to="gateway.port", type=int)
    flag(p, "--api-key", to="gateway.api_keys", action="append", metavar="KEY",
          help="accepted API key (repeatable; replaces the variable's comma-separated list)",
          shown_default="none")
    flag(p, "--max-in-flight", to="gateway.max_in_flight_requests", type=int)
    flag(p, "--max-body-bytes", to="gateway.max_body_bytes", type=int)


def walk_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every subcommand parser under it, depth first."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found.extend(walk_parsers(child))
    return found


class DeprecatedAlias(argparse.Action):
    """A renamed flag: stores like its new name and warns once on stderr."""

    def __call__(self, _parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        sys.stderr.write(f"warning: {option_string} is deprecated (in `moeflow up` it counts "
                         "expert instances, not experts per layer); use --expert-instances\n")
        setattr(namespace, self.dest, values)
