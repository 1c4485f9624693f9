"""`moeflow warm-pool`: run one warm-pool worker (the process of a WarmPool's Pod).

The worker does the engine's imports and torch set-up, listens on ``--socket`` for one claim,
then becomes the claimed engine instance (``moeflow.coldstart.warm_pool.worker_main``). The
operator runs it as ``python -m moeflow.coldstart.warm_pool_cli --socket PATH`` until the CLI
has a ``warm-pool`` command delegating to ``main``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_SOCKET = "/var/run/moeflow/warm.sock"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeflow warm-pool",
        description="Pre-import the engine and wait on a Unix socket for one claim.")
    parser.add_argument("--socket", type=Path,
                        default=Path(os.environ.get("MOEFLOW_WARM_SOCKET", DEFAULT_SOCKET)),
                        help="where to listen for the claim (default: $MOEFLOW_WARM_SOCKET or"
                        f" {DEFAULT_SOCKET})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.socket.parent.mkdir(parents=True, exist_ok=True)
    from moeflow.coldstart.warm_pool import worker_main

    return worker_main(args.socket)


if __name__ == "__main__":
    sys.exit(main())
