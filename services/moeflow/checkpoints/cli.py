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
from typing import TYPE_CHECKING, Any

from moeflow.checkpoints.registry import PULLABLE, TINY_ARCHS, tiny_dir_name
from moeflow.checkpoints.store import ModelNotCachedError, list_models, models_dir, resolve_model

if TYPE_CHECKING:
    from moeflow.checkpoints.upcycle import UpcycleSpec

HomeFn = Callable[[], Path]


class HelpFormatter(argparse.HelpFormatter):
    """Shared by every moeflow command (kept here, low in the layers, so that the store and
    other delegated commands can use it). Every flag's help ends with its default, like
    kubectl's and helm's: ``(default: X)`` unless the help already names it (the settings
    flags say ``[default X; env VAR]``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                               argparse._SubParsersAction)):
            return text
        if action.required:
            return f"{text} (required)".strip()
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)".strip()
        return text


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


class StageBar:
    """Progress of a multi-stage job on stderr: ``progress(stage, fraction)`` moves it.

    On a terminal, one tqdm bar (percent, elapsed, ETA) with the current stage beside it; in a
    log (not a TTY), one line per new stage: ``[ 15%] stage (elapsed 3s, ETA 17s)``, so a
    stage repeated with a new fraction moves the bar but prints nothing new.
    """

    def __init__(self, title: str) -> None:
        import time

        self._clock = time.monotonic
        self._start = self._clock()
        self._last_stage = ""
        self._bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(total=100, desc=title, unit="%", file=sys.stderr,
                             dynamic_ncols=True,
                             bar_format="{desc} {percentage:3.0f}%|{bar:20}| "
                                        "[{elapsed}<{remaining}] {postfix}")

    def __call__(self, stage: str, fraction: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(stage, refresh=False)
            self._bar.update(max(0, round(fraction * 100) - self._bar.n))
            return
        if stage == self._last_stage:
            return
        self._last_stage = stage
        elapsed = self._clock() - self._start
        eta = f", ETA {elapsed * (1 - fraction) / fraction:.0f}s" if 0 < fraction < 1 else ""
        sys.stderr.write(f"[{fraction:4.0%}] {stage} (elapsed {elapsed:.0f}s{eta})\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


SupportedFn = Callable[[], "frozenset[str] | None"]
"""The model_types the engine runs (None: no check); given by the caller, since this package
sits below the engine."""


def _handle_pull(args: argparse.Namespace, home_from_env: HomeFn,
                 supported: SupportedFn = lambda: None) -> int:
    from moeflow.checkpoints.hub import ModelRefError, parse_model_ref
    from moeflow.checkpoints.pull import PullError, pull, pull_hub

    bar: StageBar | None = None
    try:
        if args.name in PULLABLE:
            bar = StageBar(f"pull {args.name}")
            path = pull(args.name, home_from_env(), bar)
        else:
            ref = parse_model_ref(args.name)
            if ref.kind != "hub":
                raise ModelRefError(
                    f"unknown model {args.name!r}: pull a Hugging Face repo as org/name or "
                    f"hf://org/name[@revision], or one of: {', '.join(sorted(PULLABLE))}")
            path = pull_hub(ref, home_from_env(), supported=supported(),
                            name=args.local_name)
    except (ModelRefError, PullError) as error:
        if bar is not None:
            bar.close()
        sys.stderr.write(f"moeflow models pull: error: {error}\n")
        return 1
    if bar is not None:
        bar.close()
    sys.stdout.write(f"{path}\n")
    return 0


def _handle_make_tiny(args: argparse.Namespace, home_from_env: HomeFn) -> int:
    from moeflow.checkpoints.pull import quiet_transformers
    from moeflow.checkpoints.tiny import make_tiny

    out_dir: Path = (
        args.out
        if args.out is not None
        else (models_dir(home_from_env()) / tiny_dir_name(args.arch))
    )
    with quiet_transformers():  # its "Writing model shards" bar says nothing here
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
        _warn_output_size(source_dir, spec)
        bar = StageBar(f"upcycle {name}")
        try:
            path = upcycle(source_dir, out_dir, spec, name=name, progress=bar)
        finally:
            bar.close()
    except (ModelNotCachedError, UpcycleError) as error:
        sys.stderr.write(f"moeflow models upcycle: error: {error}\n")
        return 1
    sys.stdout.write(f"{path}\n")
    return 0


def _warn_output_size(source_dir: Path, spec: UpcycleSpec) -> None:
    """Say up front how big the output will be: the MLP weights are copied per expert."""
    from moeflow.checkpoints.upcycle import estimated_output_bytes

    size = estimated_output_bytes(source_dir, spec)
    if size:
        sys.stderr.write(f"note: the upcycled checkpoint will take about "
                         f"{format_size_bytes(size)} on disk\n")


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
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], home_from_env: HomeFn,
    supported: SupportedFn = lambda: None,
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
        "name", metavar="NAME",
        help="a Hugging Face repo (org/name[@revision] or hf://org/name[@revision]; honours "
        f"HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN) or one of: {', '.join(sorted(PULLABLE))}"
    )
    pull_parser.add_argument(
        "--name", dest="local_name", default=None, metavar="LOCAL_NAME",
        help="name under <home>/models (default: the repo's last part)")
    pull_parser.set_defaults(
        func=partial(_handle_pull, home_from_env=home_from_env, supported=supported))

    tiny_parser = commands.add_parser(
        "make-tiny", help="write a tiny random checkpoint (with tokenizer) for tests"
    )
    tiny_parser.add_argument("--arch", required=True, choices=TINY_ARCHS,
                             help="HF model_type to build (required; no default)")
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
    upcycle_parser.add_argument("--experts", type=int, default=8,
                                help="experts per layer (default: 8)")
    upcycle_parser.add_argument("--top-k", type=int, default=2,
                                help="experts per token (default: 2)")
    upcycle_parser.add_argument(
        "--perturb", type=float, default=0.0, metavar="STD",
        help="std of Gaussian noise added to each expert's weights (default 0: exact copies)",
    )
    upcycle_parser.add_argument(
        "--router-std", type=float, default=None, metavar="STD",
        help="std of the router init (default: the source's initializer_range; 0: uniform)",
    )
    upcycle_parser.add_argument("--seed", type=int, default=0,
                                help="router/noise seed (default: 0)")
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
