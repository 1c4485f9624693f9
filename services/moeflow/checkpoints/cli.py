"""`moeflow models ...`: pull, make-tiny, upcycle and list local checkpoints.

Contract:
- `register(subparsers, home_from_env)` adds the `models` command with the subcommands
  `pull NAME`, `make-tiny --arch ARCH [--out DIR] [--seed N]`,
  `upcycle SOURCE [--experts E] [--top-k K] [--perturb STD] [--router-std STD] [--seed N]
  [--out DIR] [--name NAME]` (SOURCE: a checkpoint dir or cached name; default output
  `<home>/models/<NAME>`, NAME defaulting to `<source>-moe<E>x<K>`) and `list`. Each subcommand sets
  `args.func`, a handler `(args) -> int` exit code (0 ok, 1 failure). `home_from_env()` is called
  only when a handler runs, never at registration.
- Registration imports nothing heavy; torch/transformers are imported by the pull, make-tiny
  and upcycle handlers only.
- Results (paths, the table) go to stdout; progress and errors go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from moeflow.checkpoints.registry import PULLABLE, TINY_ARCHS, tiny_dir_name
from moeflow.checkpoints.store import ModelNotCachedError, list_models, models_dir, resolve_model

HomeFn = Callable[[], Path]


def format_param_count(num_params: int) -> str:
    """134515008 -> "134.5M", 106816 -> "106.8K", 12 -> "12"."""
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if num_params >= threshold:
            return f"{num_params / threshold:.1f}{suffix}"
    return str(num_params)


def format_size_bytes(size_bytes: int) -> str:
    """Binary units: 538090408 -> "513.2 MiB"."""
    size = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _print_progress(stage: str, fraction: float) -> None:
    sys.stderr.write(f"[{fraction:4.0%}] {stage}\n")
    sys.stderr.flush()


def _handle_pull(args: argparse.Namespace, home_from_env: HomeFn) -> int:
    from moeflow.checkpoints.pull import PullError, pull

    try:
        path = pull(args.name, home_from_env(), _print_progress)
    except (ValueError, PullError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    sys.stdout.write(f"{path}\n")
    return 0


def _handle_make_tiny(args: argparse.Namespace, home_from_env: HomeFn) -> int:
    from moeflow.checkpoints.tiny import make_tiny

    out_dir: Path = (
        args.out
        if args.out is not None
        else (models_dir(home_from_env()) / tiny_dir_name(args.arch))
    )
    path = make_tiny(args.arch, out_dir, seed=args.seed)
    sys.stdout.write(f"{path}\n")
    return 0


def _handle_upcycle(args: argparse.Namespace, home_from_env: HomeFn) -> int:
    from moeflow.checkpoints.upcycle import (
        UpcycleError,
        UpcycleSpec,
        default_upcycled_name,
        upcycle,
    )

    spec = UpcycleSpec(
        num_experts=args.experts,
        top_k=args.top_k,
        perturb_std=args.perturb,
        seed=args.seed,
        router_std=args.router_std,
    )
    try:
        home = home_from_env()
        source_dir = resolve_model(args.source, home)
        name = args.name or (
            args.out.name if args.out is not None else default_upcycled_name(source_dir.name, spec)
        )
        out_dir: Path = args.out if args.out is not None else models_dir(home) / name
        path = upcycle(source_dir, out_dir, spec, name=name, progress=_print_progress)
    except (ModelNotCachedError, UpcycleError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    sys.stdout.write(f"{path}\n")
    return 0


def render_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the first row is the header."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _handle_list(_args: argparse.Namespace, home_from_env: HomeFn) -> int:
    home = home_from_env()
    models = list_models(home)
    if not models:
        sys.stderr.write(
            f"no models cached under {models_dir(home)}; run `moeflow models pull NAME` "
            f"({', '.join(sorted(PULLABLE))}) or `moeflow models make-tiny --arch ARCH`\n"
        )
        return 0
    rows = [("NAME", "ARCHITECTURE", "PARAMS", "SIZE")] + [
        (
            model.name,
            model.architecture,
            format_param_count(model.num_params),
            format_size_bytes(model.size_bytes),
        )
        for model in models
    ]
    sys.stdout.write(render_table(rows))
    return 0


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], home_from_env: HomeFn
) -> None:
    """Add `models {pull,make-tiny,upcycle,list}` to subparsers (see the module docstring)."""
    models = subparsers.add_parser(
        "models", help="pull, create and list local model checkpoints (under MOEFLOW_HOME)"
    )
    commands = models.add_subparsers(dest="models_command", metavar="COMMAND", required=True)

    pull_parser = commands.add_parser(
        "pull", help="download a model and convert it to an fp32 HF checkpoint"
    )
    pull_parser.add_argument(
        "name", metavar="NAME", help=f"model to pull: {', '.join(sorted(PULLABLE))}"
    )
    pull_parser.set_defaults(func=partial(_handle_pull, home_from_env=home_from_env))

    tiny_parser = commands.add_parser(
        "make-tiny", help="write a tiny random checkpoint (with tokenizer) for tests"
    )
    tiny_parser.add_argument("--arch", required=True, choices=TINY_ARCHS)
    tiny_parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output directory (default: <home>/models/tiny-<arch>)",
    )
    tiny_parser.add_argument("--seed", type=int, default=0, help="weight init seed (default 0)")
    tiny_parser.set_defaults(func=partial(_handle_make_tiny, home_from_env=home_from_env))

    upcycle_parser = commands.add_parser(
        "upcycle",
        help="turn a dense llama/mistral checkpoint into a Mixtral MoE (experts = MLP copies)",
    )
    upcycle_parser.add_argument("source", metavar="SOURCE", help="checkpoint dir or cached name")
    upcycle_parser.add_argument("--experts", type=int, default=8, help="experts per layer (8)")
    upcycle_parser.add_argument("--top-k", type=int, default=2, help="experts per token (2)")
    upcycle_parser.add_argument(
        "--perturb", type=float, default=0.0, metavar="STD",
        help="std of Gaussian noise added to each expert's weights (default 0: exact copies)",
    )
    upcycle_parser.add_argument(
        "--router-std", type=float, default=None, metavar="STD",
        help="std of the router init (default: the source's initializer_range; 0: uniform)",
    )
    upcycle_parser.add_argument("--seed", type=int, default=0, help="router/noise seed (0)")
    upcycle_parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR",
        help="output directory (default: <home>/models/<NAME>)",
    )
    upcycle_parser.add_argument(
        "--name", default=None, metavar="NAME",
        help="model name (default: <source>-moe<E>x<K>, or the --out dir's name)",
    )
    upcycle_parser.set_defaults(func=partial(_handle_upcycle, home_from_env=home_from_env))

    list_parser = commands.add_parser("list", help="list cached models")
    list_parser.set_defaults(func=partial(_handle_list, home_from_env=home_from_env))
