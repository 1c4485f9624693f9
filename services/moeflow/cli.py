"""The `moeflow` console script: one entry point, one subcommand per process kind.

Settings objects are built here, from flags and the environment, and passed down; nothing below
this module reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from moeflow.checkpoints import cli as models_cli
from moeflow.checkpoints.store import resolve_home
from moeflow.controller import cli as operator_cli
from moeflow.domain.roles import Role


def _home() -> Path:
    return resolve_home(os.environ)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--num-threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--kv-cache-mb", type=int, default=512, help="KV-cache memory in MiB")
    p.add_argument("--max-model-len", type=int, default=0, help="context length (0: model's)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-num-waiting", type=int, default=256)
    p.add_argument("--no-prefix-caching", action="store_true")
    # pods get these from the operator as MOEFLOW_TRANSPORT / MOEFLOW_REDIS_URL
    p.add_argument("--transport", choices=["shm", "redis"],
                   default=os.environ.get("MOEFLOW_TRANSPORT", "shm"),
                   help="XCCL backend for prefill->decode KV transfer")
    p.add_argument("--redis-url", default=os.environ.get("MOEFLOW_REDIS_URL") or None,
                   help="Redis for --transport redis (moeflow up starts one if not given)")
    p.add_argument("--num-micro-batches", type=int, default=2,
                   help="attention role: micro-batches per step (overlap with the experts)")
    p.add_argument("--micro-batch-min-tokens", type=int, default=64,
                   help="attention role: split a step only if each micro-batch gets this many "
                   "tokens")
    p.add_argument("--expert-timeout-s", type=float, default=30.0,
                   help="attention role: wait this long for an expert instance's answer")


def _engine_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "--dtype", args.dtype,
        "--num-threads", str(args.num_threads),
        "--kv-cache-mb", str(args.kv_cache_mb),
        "--max-model-len", str(args.max_model_len),
        "--max-num-seqs", str(args.max_num_seqs),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--max-num-waiting", str(args.max_num_waiting),
    ]
    if args.no_prefix_caching:
        argv.append("--no-prefix-caching")
    argv += ["--transport", args.transport]
    argv += ["--num-micro-batches", str(args.num_micro_batches),
             "--micro-batch-min-tokens", str(args.micro_batch_min_tokens),
             "--expert-timeout-s", str(args.expert_timeout_s)]
    return argv


def _run_engine(args: argparse.Namespace) -> int:
    import uvicorn

    from moeflow.checkpoints.store import resolve_model
    from moeflow.engine.config import EngineSettings

    model_path = resolve_model(args.model, _home())
    settings = EngineSettings(
        model_path=model_path,
        served_model_name=args.served_model_name or args.model.rstrip("/").split("/")[-1],
        role=args.role,
        rank=args.rank,
        instance_id=args.instance_id,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        num_threads=args.num_threads,
        kv_cache_bytes=args.kv_cache_mb * 1024 * 1024,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_waiting=args.max_num_waiting,
        enable_prefix_caching=not args.no_prefix_caching,
        transport=args.transport,
        group=args.group,
        redis_url=args.redis_url,
        num_expert_instances=args.num_expert_instances,
        num_attention_instances=args.num_attention_instances,
        num_micro_batches=args.num_micro_batches,
        micro_batch_min_tokens=args.micro_batch_min_tokens,
        expert_timeout_s=args.expert_timeout_s,
        model_store=args.model_store,
    )
    if settings.role is Role.EXPERT:
        from moeflow.engine.ae.expert_app import build_expert_app

        app = build_expert_app(settings)
    else:  # cold start: node store, warm-up, the five-step record (moeflow.coldstart)
        from moeflow.coldstart.launch import serve_engine
        from moeflow.domain.coldstart import ColdStartRecord

        return serve_engine(settings, ColdStartRecord.from_process(os.environ))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    return 0


def _gateway_settings(args: argparse.Namespace, engine_urls: Sequence[str]) -> object:
    from pydantic import SecretStr

    from moeflow.gateway.settings import GatewaySettings

    keys = list(args.api_key or [])
    keys += [k for k in os.environ.get("MOEFLOW_API_KEYS", "").split(",") if k.strip()]
    return GatewaySettings(
        host=args.host,
        port=args.port,
        engine_urls=tuple(engine_urls),
        api_keys=tuple(SecretStr(k.strip()) for k in keys),
        max_in_flight_requests=args.max_in_flight,
        max_body_bytes=args.max_body_bytes,
        pd_min_prompt_tokens=getattr(args, "pd_min_prompt_tokens", 256),
        discovery=getattr(args, "discovery", "static"),
        namespace=getattr(args, "namespace", "default"),
        served_model_name=getattr(args, "served_model_name", ""),
        max_waiting_for_scale_up=getattr(args, "max_waiting_for_scale_up", 64),
        scale_up_timeout_s=getattr(args, "scale_up_timeout_s", 300.0),
    )


def _add_autoscaling_flags(p: argparse.ArgumentParser) -> None:
    """`moeflow up` autoscaling (moeflow.runtime.scaler); off unless one of the first three is
    given, so today's fixed --instances stays the default."""
    g = p.add_argument_group("autoscaling (off unless --min/--max-replicas or --idle-window-s)")
    g.add_argument("--min-replicas", type=int, default=None,
                   help="fewest engine instances; 0 allows scale to zero (default when on: 1)")
    g.add_argument("--max-replicas", type=int, default=None,
                   help="most engine instances (default when on: --instances)")
    g.add_argument("--idle-window-s", type=float, default=None,
                   help="no request for this long: scale to --min-replicas (default when on: 300)")
    g.add_argument("--max-waiting-for-scale-up", type=int, default=64,
                   help="requests held while the model scales up from zero; past it, 429")
    g.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="scale up when the recent p90 time to first token is above this")
    g.add_argument("--slo-tpot-ms", type=float, default=None,
                   help="scale up when the recent p90 time per output token is above this")
    g.add_argument("--scale-up-timeout-s", type=float, default=300.0,
                   help="longest a request waits for a scale-up from zero; then 503")


def _add_gateway_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", action="append", help="accepted API key (repeatable); "
                   "also read from MOEFLOW_API_KEYS (comma-separated)")
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--max-body-bytes", type=int, default=1024 * 1024)


def _run_gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from moeflow.gateway.app import build_app
    from moeflow.gateway.settings import GatewaySettings

    if args.discovery == "kubernetes" and not args.served_model_name:
        sys.stderr.write("error: --discovery kubernetes needs --served-model-name\n")
        return 2
    settings = _gateway_settings(args, args.engine)
    assert isinstance(settings, GatewaySettings)
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


# Subcommands that parse their own flags (--help included): name -> (module with
# `main(argv) -> int`, help). Imported only when used, so grpc and the store stay out of the rest.
DELEGATED: dict[str, tuple[str, str]] = {
    "store": ("moeflow.coldstart.store_cli",
              "node model store for DRAM pre-loading: add|list|evict|pin|unpin|agent"),
    "device-plugin": ("moeflow.deviceplugin.__main__",
                      "kubelet device plugin advertising moeflow.dev/npu"),
    "warm-pool": ("moeflow.coldstart.warm_pool_cli",
                  "a pre-warmed engine worker (imports done, no model) on a socket"),
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
    stats = httpx.get(f"{attention[0]}/v1/experts/stats", timeout=10).json()
    balancer = ExpertBalancer(attention, experts, len(stats["routed_tokens_per_expert"]),
                              budget=None if args.budget < 0 else args.budget)
    try:
        balancer.run(args.interval_s, threading.Event(), refresh)
    finally:
        balancer.close()
        if discovery is not None:
            discovery.close()
    return 0


def _run_up(args: argparse.Namespace) -> int:
    from moeflow.runtime.local import LocalRuntime

    return LocalRuntime(args, home=_home(), engine_argv=_engine_argv(args)).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeflow", description="Serve MoE LLMs locally or on K8s")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    models_cli.register(sub, _home)
    operator_cli.register(sub)
    for name, (_, help_text) in DELEGATED.items():  # listed in --help; main() dispatches them
        sub.add_parser(name, add_help=False, help=help_text)

    engine = sub.add_parser("engine", help="run one engine instance (HTTP)")
    engine.add_argument("--model", required=True, help="cached model name or checkpoint folder")
    engine.add_argument("--served-model-name", default="")
    engine.add_argument("--role", default="colocated",
                        choices=[r.value for r in Role])
    engine.add_argument("--rank", type=int, default=0)
    engine.add_argument("--instance-id", default="")
    engine.add_argument("--group", default="", help="XCCL group (default: served model name)")
    engine.add_argument("--host", default="127.0.0.1")
    engine.add_argument("--port", type=int, default=8001)
    engine.add_argument("--num-expert-instances", type=int, default=0,
                        help="attention/expert roles: size of the expert fleet")
    engine.add_argument("--num-attention-instances", type=int, default=0,
                        help="expert role: attention instances it serves")
    _add_engine_flags(engine)
    engine.add_argument("--model-store", type=Path,
                        default=os.environ.get("MOEFLOW_ENGINE_MODEL_STORE") or None,
                        help="node model store (DRAM pre-load), e.g. /dev/shm/moeflow-store")
    engine.set_defaults(func=_run_engine)

    gateway = sub.add_parser("gateway", help="run the OpenAI-compatible gateway")
    gateway.add_argument("--engine", action="append", default=[], help="engine URL (repeatable)")
    gateway.add_argument("--discovery", choices=["static", "kubernetes"], default="static")
    gateway.add_argument("--namespace", default="default")
    gateway.add_argument("--served-model-name", default="")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8000)
    _add_gateway_flags(gateway)
    gateway.set_defaults(func=_run_gateway)

    balancer = sub.add_parser("balancer", help="expert load balancer of one attention/expert "
                              "Model (moeflow up --mode ae runs one itself)")
    balancer.add_argument("--discovery", choices=["static", "kubernetes"], default="static")
    balancer.add_argument("--namespace", default="default")
    balancer.add_argument("--served-model-name", default="")
    balancer.add_argument("--num-expert-instances", type=int, default=0,
                          help="kubernetes discovery: expert ranks of the Model")
    balancer.add_argument("--attention", action="append", default=[],
                          help="static: attention instance URL (repeatable)")
    balancer.add_argument("--expert", action="append", default=[],
                          help="static: expert instance URL, in rank order (repeatable)")
    balancer.add_argument("--interval-s", type=float, default=30.0)
    balancer.add_argument("--budget", type=int, default=-1,
                          help="extra replicas in total (-1: one per expert instance)")
    balancer.set_defaults(func=_run_balancer)

    up = sub.add_parser("up", help="run the whole platform locally (gateway + engine processes)")
    up.add_argument("--model", default="smollm2-135m-instruct")
    up.add_argument("--served-model-name", default="")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--engine-port", type=int, default=0, help="first engine port (0: any free)")
    up.add_argument("--mode", choices=["colocated", "pd", "ae"], default="colocated",
                    help="pd: prefill/decode disaggregation; ae: attention/expert "
                    "disaggregation (MoE models); both over XCCL")
    up.add_argument("--instances", type=int, default=1, help="colocated instances")
    up.add_argument("--prefill", type=int, default=1, help="prefill instances (--mode pd)")
    up.add_argument("--decode", type=int, default=1, help="decode instances (--mode pd)")
    up.add_argument("--attention", type=int, default=1, help="attention instances (--mode ae)")
    up.add_argument("--experts", type=int, default=2, help="expert instances (--mode ae)")
    up.add_argument("--expert-budget", type=int, default=-1,
                    help="--mode ae: extra expert replicas in total (-1: one per expert instance)")
    up.add_argument("--rebalance-interval-s", type=float, default=30.0,
                    help="--mode ae: expert load balancing period (0: off)")
    up.add_argument("--pd-min-prompt-tokens", type=int, default=256,
                    help="with both colocated and split instances, split prompts this long")
    _add_engine_flags(up)
    _add_gateway_flags(up)
    _add_autoscaling_flags(up)
    up.set_defaults(func=_run_up)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in DELEGATED:  # they own their flags, --help included
        logging.basicConfig(level=logging.INFO)
        return _run_delegated(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per stats poll is noise
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
