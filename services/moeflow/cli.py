"""The `moeflow` console script: one entry point, one subcommand per process kind.

Settings objects are built here, from flags and the environment, and passed down; nothing below
this module reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from moeflow.checkpoints import cli as models_cli
from moeflow.checkpoints.store import resolve_home
from moeflow.controller import cli as operator_cli


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
    return argv


def _run_engine(args: argparse.Namespace) -> int:
    import uvicorn

    from moeflow.checkpoints.store import resolve_model
    from moeflow.engine.config import EngineSettings
    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.engine.server import build_engine_app

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
    )
    if settings.role not in ("colocated", "prefill", "decode"):
        sys.stderr.write(f"error: role {settings.role!r} is not available yet\n")
        return 2
    app = build_engine_app(LLMEngine(settings))
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
    )


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


def _run_up(args: argparse.Namespace) -> int:
    from moeflow.runtime.local import LocalRuntime

    return LocalRuntime(args, home=_home(), engine_argv=_engine_argv(args)).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeflow", description="Serve MoE LLMs locally or on K8s")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    models_cli.register(sub, _home)
    operator_cli.register(sub)

    engine = sub.add_parser("engine", help="run one engine instance (HTTP)")
    engine.add_argument("--model", required=True, help="cached model name or checkpoint folder")
    engine.add_argument("--served-model-name", default="")
    engine.add_argument("--role", default="colocated",
                        choices=["colocated", "prefill", "decode", "attention", "expert"])
    engine.add_argument("--rank", type=int, default=0)
    engine.add_argument("--instance-id", default="")
    engine.add_argument("--group", default="", help="XCCL group (default: served model name)")
    engine.add_argument("--host", default="127.0.0.1")
    engine.add_argument("--port", type=int, default=8001)
    _add_engine_flags(engine)
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

    up = sub.add_parser("up", help="run the whole platform locally (gateway + engine processes)")
    up.add_argument("--model", default="smollm2-135m-instruct")
    up.add_argument("--served-model-name", default="")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--engine-port", type=int, default=0, help="first engine port (0: any free)")
    up.add_argument("--mode", choices=["colocated", "pd"], default="colocated",
                    help="pd: prefill/decode disaggregation over XCCL")
    up.add_argument("--instances", type=int, default=1, help="colocated instances")
    up.add_argument("--prefill", type=int, default=1, help="prefill instances (--mode pd)")
    up.add_argument("--decode", type=int, default=1, help="decode instances (--mode pd)")
    up.add_argument("--pd-min-prompt-tokens", type=int, default=256,
                    help="with both colocated and split instances, split prompts this long")
    _add_engine_flags(up)
    _add_gateway_flags(up)
    up.set_defaults(func=_run_up)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
