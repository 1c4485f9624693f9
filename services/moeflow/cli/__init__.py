"""The `moeflow` console script: one entry point, one subcommand per process kind.

Each process builds one typed settings object here, once, and passes it down: `moeflow engine`
an ``EngineSettings``, `moeflow gateway` a ``GatewaySettings``, `moeflow up` a
``LocalPlatformSettings``. Every flag defaults to "not given" and is passed to the settings
only when given, so the precedence is flag > environment > the defaults of the settings
classes (the one place defaults live; ``--help`` shows them with their variables).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moeflow.checkpoints import cli as models_cli
from moeflow.checkpoints.cli import HelpFormatter
from moeflow.checkpoints.store import resolve_home
from moeflow.cli.flags import (
    DeprecatedAlias,
    InvalidSettings,
    UsageError,
    add_autoscaling_flags,
    add_engine_flags,
    add_gateway_flags,
    add_supervision_flags,
    build_settings,
    env_default,
    env_help,
    env_names,
    flag,
    given,
    walk_parsers,
)
from moeflow.controller import cli as operator_cli
from moeflow.domain.roles import Role
from moeflow.engine.config import EngineOptions, EngineSettings
from moeflow.gateway.settings import GatewaySettings
from moeflow.runtime.settings import (
    MODE_ALIASES,
    AutoscalingSettings,
    LocalPlatformSettings,
    SupervisionSettings,
)


def version_text() -> str:
    """``moeflow X.Y.Z`` from the installed distribution's metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"moeflow {version('moeflow')}"
    except PackageNotFoundError:
        return "moeflow (not installed: running from a source tree)"






def _home() -> Path:
    return resolve_home(os.environ)


















def _supported_architectures() -> frozenset[str]:
    from moeflow.engine.models.arch import SUPPORTED_MODEL_TYPES

    return SUPPORTED_MODEL_TYPES


def obtain(model: str, home: Path) -> tuple[Path, str]:
    """Any model reference -> (local checkpoint folder, default served name); models whose
    architecture the engine does not run are refused here, before anything is loaded."""
    from moeflow.checkpoints.obtain import obtain_model
    from moeflow.engine.models.arch import SUPPORTED_MODEL_TYPES

    return obtain_model(model, home, supported=SUPPORTED_MODEL_TYPES)


def engine_settings(args: argparse.Namespace, home: Path) -> EngineSettings:
    """``moeflow engine``'s settings: the given flags, then MOEFLOW_ENGINE_*, then defaults."""
    folder, name = obtain(args.model, home)
    values = given(args, "engine")
    if "served_model_name" not in values and not any(
            os.environ.get(var) for var in env_names("engine", "served_model_name")):
        values["served_model_name"] = name  # a Hub snapshot folder is named by its commit
    return build_settings(EngineSettings, model_path=folder, **values)


def _run_engine(args: argparse.Namespace) -> int:
    import uvicorn

    settings = engine_settings(args, _home())
    if settings.role is Role.EXPERT:
        from moeflow.engine.ae.expert_app import build_expert_app

        app = build_expert_app(settings)
    else:  # cold start: node store, warm-up, the five-step record (moeflow.coldstart)
        from moeflow.coldstart.launch import serve_engine
        from moeflow.domain.coldstart import ColdStartRecord

        return serve_engine(settings, ColdStartRecord.from_process(os.environ))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0


def gateway_settings(args: argparse.Namespace) -> GatewaySettings:
    """``moeflow gateway``'s settings: the given flags, then MOEFLOW_GATEWAY_* (and
    MOEFLOW_API_KEYS, MOEFLOW_INTERNAL_TOKEN), then defaults."""
    return build_settings(GatewaySettings, **given(args, "gateway"))


def platform_settings(args: argparse.Namespace) -> LocalPlatformSettings:
    """``moeflow up``'s settings: each part from its flags, then its variables, then defaults."""
    return build_settings(
        LocalPlatformSettings,
        gateway=build_settings(GatewaySettings, **given(args, "gateway")),
        engine=build_settings(EngineOptions, **given(args, "engine")),
        autoscaling=build_settings(AutoscalingSettings, **given(args, "autoscaling")),
        supervision=build_settings(SupervisionSettings, **given(args, "supervision")),
        log_level=args.log_level,
        **given(args, "up"),
    )








def _run_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from moeflow.gateway.app import build_app

    settings = gateway_settings(args)
    if settings.discovery == "kubernetes" and not settings.served_model_name:
        raise UsageError("--discovery kubernetes needs --served-model-name NAME")
    if settings.discovery == "static" and not settings.engine_urls:
        raise UsageError("no engine to serve: pass --engine URL (repeatable; or "
                         "MOEFLOW_GATEWAY_ENGINE_URLS), or --discovery kubernetes, or run "
                         "`moeflow up` for a gateway with its engines")
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


_MODEL_REF_HELP = ("a checkpoint folder, hf://org/name[@rev] or org/name (Hugging Face Hub),"
                   " store://NAME or a cached name")

# Subcommands that parse their own flags (--help included): name -> (module with
# `main(argv) -> int`, help). Imported only when used, so grpc and the store stay out of the rest.
DELEGATED: dict[str, tuple[str, str]] = {
    "store": ("moeflow.coldstart.store_cli",
              "node model store for DRAM pre-loading: add|list|evict|pin|unpin|agent"),
    "device-plugin": ("moeflow.deviceplugin.__main__",
                      "kubelet device plugin advertising moeflow.dev/npu"),
    "warm-pool": ("moeflow.coldstart.warm_pool_cli",
                  "a pre-warmed engine worker (imports done, no model) on a socket"),
    "finetune": ("moeflow.training.cli", "LoRA fine-tuning of a local model on JSONL chat data"),
    "tenants": ("moeflow.gateway.tenants_cli", "gateway tenants: add-key|revoke-key|list"),
}


def _run_delegated(name: str, argv: Sequence[str]) -> int:
    import importlib

    code: int = importlib.import_module(DELEGATED[name][0]).main(list(argv))
    return code


def _run_balancer(args: argparse.Namespace) -> int:
    """The expert balancer as its own process (one per attention/expert Model on a cluster)."""
    import asyncio
    import threading

    import httpx

    from moeflow.engine.ae.balancer import ExpertBalancer, fleet_urls
    from moeflow.kube.discovery import KubeTaskDiscovery
    from moeflow.web.internal_auth import internal_headers, token_from_env

    if args.interval_s <= 0:
        raise UsageError(f"--interval-s must be > 0, got {args.interval_s}")
    if args.discovery == "static" and not args.attention:
        raise UsageError("no attention instance to balance: pass --attention URL and --expert "
                         "URL (repeatable), or --discovery kubernetes --served-model-name NAME")
    if args.discovery == "static" and not args.expert:
        raise UsageError("no expert instance to balance: pass --expert URL (repeatable, in "
                         "rank order)")
    if args.discovery == "kubernetes" and not args.served_model_name:
        raise UsageError("--discovery kubernetes needs --served-model-name NAME")
    if args.discovery == "kubernetes":
        _require_kubeconfig()
    discovery = KubeTaskDiscovery(args.namespace) if args.discovery == "kubernetes" else None

    def refresh() -> tuple[list[str], list[str]]:
        if discovery is None:
            return list(args.attention), list(args.expert)
        found = asyncio.run(discovery.list_instances(args.served_model_name))
        return fleet_urls([(i.role, i.rank, i.url) for i in found], args.num_expert_instances)

    attention, experts = refresh()
    while not attention:  # wait for the first attention instance to learn the expert count
        time.sleep(args.interval_s)
        attention, experts = refresh()
    stats = httpx.get(f"{attention[0]}/v1/experts/stats", timeout=10,
                      headers=internal_headers(token_from_env())).json()
    balancer = ExpertBalancer(attention, experts, len(stats["routed_tokens_per_expert"]),
                              budget=None if args.budget < 0 else args.budget)
    try:
        balancer.run(args.interval_s, threading.Event(), refresh)
    finally:
        balancer.close()
        if discovery is not None:
            discovery.close()
    return 0


def _require_kubeconfig() -> None:
    """In a Pod, its service account; outside, KUBECONFIG or ~/.kube/config. Missing: one
    line and exit 2, instead of a client that retries with a traceback every minute."""
    from kubernetes import config as kube_config
    from kubernetes.config.config_exception import ConfigException

    try:
        kube_config.load_incluster_config()  # type: ignore[no-untyped-call]
        return
    except ConfigException:
        pass
    try:
        kube_config.load_kube_config()  # type: ignore[no-untyped-call]
    except (ConfigException, OSError, TypeError) as exc:
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"no Kubernetes cluster configured: not in a Pod and {where} is "
                         f"unusable ({first}); set KUBECONFIG or run inside the cluster") from None


OPERATOR_ENV: dict[str, tuple[str, Any]] = {
    "namespace": ("MOEFLOW_OPERATOR_WATCH_NAMESPACE", str),
    "standalone": ("MOEFLOW_OPERATOR_STANDALONE", lambda v: v.lower() in ("1", "true", "yes")),
    "liveness": ("MOEFLOW_OPERATOR_LIVENESS", str),
}
"""`moeflow operator` flags -> (variable, parse). MOEFLOW_OPERATOR_NAMESPACE is taken: it is
where the operator runs (OperatorSettings), not what it watches."""


def _with_env(parser: argparse.ArgumentParser,
              table: dict[str, tuple[str, Any]]) -> argparse.ArgumentParser:
    """Give a parser we do not build (the operator's) flag > env > default for ``table``."""
    for action in parser._actions:
        if action.dest in table:
            var, cast = table[action.dest]
            action.default = env_default(var, action.default, cast)
            action.help = f"{action.help or ''} (default: %(default)s; env {var})".strip()
    return parser


def _run_operator(args: argparse.Namespace) -> int:
    if args.all_namespaces:  # -A beats a namespace from the environment
        args.namespace = None
    _require_kubeconfig()
    return operator_cli.run(args)


SPLIT_COUNTS = {"colocated": ("instances",), "pd": ("prefill", "decode"),
                "ae": ("attention", "experts")}
_COUNT_FLAGS = {"instances": "--instances", "prefill": "--prefill", "decode": "--decode",
                "attention": "--attention", "experts": "--expert-instances"}


def contradictions(mode: str, given_counts: Sequence[str]) -> str | None:
    """The first instance-count flag that the mode ignores, as an error line (None: fine).
    ``mode`` is a short or CRD name; ``given_counts`` the count fields given as flags."""
    from moeflow.runtime.settings import MODE_ALIASES

    mode = MODE_ALIASES.get(mode, mode)
    allowed = SPLIT_COUNTS.get(mode, ())
    for field in given_counts:
        if field in _COUNT_FLAGS and field not in allowed:
            wanted = " and ".join(_COUNT_FLAGS[f] for f in allowed)
            return (f"{_COUNT_FLAGS[field]} does not apply to --mode {mode}; "
                    f"that mode takes {wanted}")
    return None


def _run_up(args: argparse.Namespace) -> int:
    from moeflow.runtime.local import LocalRuntime

    settings = platform_settings(args)
    problem = contradictions(settings.mode, list(given(args, "up")))
    if problem is not None:
        raise UsageError(problem)
    home = _home()
    folder, name = obtain(settings.model, home)
    settings = settings.model_copy(update={
        "model": str(folder), "served_model_name": settings.served_model_name or name})
    return LocalRuntime(settings, home=home).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeflow", formatter_class=HelpFormatter,
                                     description="Serve MoE LLMs locally or on K8s")
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("--log-level", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        default=env_default("MOEFLOW_LOG_LEVEL", "INFO", str.upper),
                        help=env_help("log verbosity", "MOEFLOW_LOG_LEVEL"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models_cli.register(sub, _home, _supported_architectures)
    _with_env(operator_cli.register(sub), OPERATOR_ENV).set_defaults(func=_run_operator)
    for name, (_, help_text) in DELEGATED.items():  # listed in --help; main() dispatches them
        sub.add_parser(name, add_help=False, help=help_text)

    engine = sub.add_parser("engine", help="run one engine instance (HTTP)")
    engine.add_argument("--model", required=True, help=f"{_MODEL_REF_HELP} (required)")
    flag(engine, "--served-model-name", to="engine.served_model_name",
          shown_default="the folder name")
    flag(engine, "--role", to="engine.role", choices=[r.value for r in Role])
    flag(engine, "--rank", to="engine.rank", type=int)
    flag(engine, "--instance-id", to="engine.instance_id")
    flag(engine, "--group", to="engine.group", help="XCCL group",
          shown_default="the served model name")
    flag(engine, "--host", to="engine.host")
    flag(engine, "--port", to="engine.port", type=int)
    flag(engine, "--num-expert-instances", to="engine.num_expert_instances", type=int,
          help="attention/expert roles: size of the expert fleet")
    flag(engine, "--num-attention-instances", to="engine.num_attention_instances", type=int,
          help="expert role: attention instances it serves")
    add_engine_flags(engine)
    engine.set_defaults(func=_run_engine)

    gateway = sub.add_parser("gateway", help="run the OpenAI-compatible gateway")
    flag(gateway, "--engine", to="gateway.engine_urls", action="append", metavar="URL",
          help="engine URL (repeatable)", shown_default="none")
    flag(gateway, "--discovery", to="gateway.discovery", choices=["static", "kubernetes"])
    flag(gateway, "--namespace", to="gateway.namespace")
    flag(gateway, "--served-model-name", to="gateway.served_model_name",
          help="kubernetes discovery: the Model to serve")
    add_gateway_flags(gateway)
    gateway.set_defaults(func=_run_gateway)

    balancer = sub.add_parser("balancer", help="expert load balancer of one attention/expert "
                              "Model (moeflow up --mode ae runs one itself)")
    _b = "MOEFLOW_BALANCER_"
    balancer.add_argument("--discovery", choices=["static", "kubernetes"],
                          default=env_default(f"{_b}DISCOVERY", "static"),
                          help=env_help("static: the URLs below; kubernetes: the Model's Tasks",
                                         f"{_b}DISCOVERY"))
    balancer.add_argument("--namespace", default=env_default(f"{_b}NAMESPACE", "default"),
                          help=env_help("kubernetes discovery: the Model's namespace",
                                         f"{_b}NAMESPACE"))
    balancer.add_argument("--served-model-name",
                          default=env_default(f"{_b}SERVED_MODEL_NAME", ""),
                          help=env_help("kubernetes discovery: the Model to balance",
                                         f"{_b}SERVED_MODEL_NAME"))
    balancer.add_argument("--num-expert-instances", type=int,
                          default=env_default(f"{_b}NUM_EXPERT_INSTANCES", 0, int),
                          help=env_help("kubernetes discovery: expert ranks of the Model",
                                         f"{_b}NUM_EXPERT_INSTANCES"))
    balancer.add_argument("--attention", action="append", default=[], metavar="URL",
                          help="static: attention instance URL (repeatable; default: none)")
    balancer.add_argument("--expert", action="append", default=[], metavar="URL",
                          help="static: expert instance URL, in rank order (repeatable; "
                          "default: none)")
    balancer.add_argument("--interval-s", type=float,
                          default=env_default(f"{_b}INTERVAL_S", 30.0, float),
                          help=env_help("seconds between two rebalancing rounds",
                                         f"{_b}INTERVAL_S"))
    balancer.add_argument("--budget", type=int, default=env_default(f"{_b}BUDGET", -1, int),
                          help=env_help("extra replicas in total (-1: one per expert instance)",
                                         f"{_b}BUDGET"))
    balancer.set_defaults(func=_run_balancer)

    up = sub.add_parser("up", help="run the whole platform locally (gateway + engine processes)")
    flag(up, "--model", to="up.model", help=_MODEL_REF_HELP)
    flag(up, "--served-model-name", to="up.served_model_name",
          shown_default="the last part of --model")
    flag(up, "--engine-port", to="up.engine_port", type=int,
          help="first engine port (0: any free)")
    flag(up, "--mode", to="up.mode", choices=["colocated", "pd", "ae", *MODE_ALIASES],
          help="pd: prefill/decode disaggregation; ae: attention/expert disaggregation (MoE "
          "models); both over XCCL; the Model CRD's names are accepted too")
    flag(up, "--instances", to="up.instances", type=int,
          help="colocated instances (--mode colocated)")
    flag(up, "--prefill", to="up.prefill", type=int, help="prefill instances (--mode pd)")
    flag(up, "--decode", to="up.decode", type=int, help="decode instances (--mode pd)")
    flag(up, "--attention", to="up.attention", type=int,
          help="attention instances (--mode ae)")
    flag(up, "--expert-instances", to="up.experts", type=int,
          help="expert instances (--mode ae); not experts per layer")
    flag(up, "--experts", to="up.experts", type=int, action=DeprecatedAlias,
          help="deprecated alias of --expert-instances")
    flag(up, "--expert-budget", to="up.expert_budget", type=int,
          help="--mode ae: extra expert replicas in total (-1: one per expert instance)")
    flag(up, "--rebalance-interval-s", to="up.rebalance_interval_s", type=float,
          help="--mode ae: expert load balancing period (0: off)")
    flag(up, "--pd-min-prompt-tokens", to="gateway.pd_min_prompt_tokens", type=int,
          help="never split shorter prompts (they are computed where they are decoded)")
    flag(up, "--pd-interference-weight", to="gateway.pd_interference_weight", type=float,
          help="split a long prompt unless the prefill queue exceeds this weight x the prompt "
          "x the requests decoding locally (routing.split_or_local)")
    add_engine_flags(up)
    add_gateway_flags(up)
    add_autoscaling_flags(up)
    add_supervision_flags(up)
    up.set_defaults(func=_run_up)
    for child in walk_parsers(parser):
        child.formatter_class = HelpFormatter
    return parser






def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Exit codes: 0 ok, 1 the model or a run failed, 2 wrong flags or
    environment (one line on stderr, never a traceback), 130 interrupted."""
    from moeflow.checkpoints.hub import ModelRefError
    from moeflow.checkpoints.store import ModelNotCachedError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in DELEGATED:  # they own their flags, --help included
        logging.basicConfig(level=logging.INFO)
        return _run_delegated(argv[0], argv[1:])
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=args.log_level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        for noisy in ("httpx", "httpx2", "huggingface_hub"):  # a line per request is noise
            logging.getLogger(noisy).setLevel(logging.WARNING)
        code: int = args.func(args)
    except InvalidSettings as exc:
        sys.stderr.write(f"moeflow {command}: invalid settings: {exc}\n")
        return 2
    except UsageError as exc:
        sys.stderr.write(f"moeflow {command}: error: {exc}\n")
        return 2
    except (ModelRefError, ModelNotCachedError) as exc:
        sys.stderr.write(f"moeflow {command}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
