"""`moeflow warm-pool`: run one warm-pool worker (the process of a WarmPool's Pod).

The worker does the engine's imports and torch set-up, waits for one claim, then becomes the
claimed engine instance (``moeflow.coldstart.warm_pool.worker_main``). Claims come on the Unix
socket ``--socket`` and, with ``--port``, as ``POST /v1/claim`` over HTTP on that port (the
operator's way in: the engine then serves on the same port). The operator runs it as
``moeflow warm-pool --socket PATH --port 8001 --host 0.0.0.0``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from moeflow.checkpoints.cli import HelpFormatter

DEFAULT_SOCKET = "/var/run/moeflow/warm.sock"
CLAIM_FILE = "claim.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeflow warm-pool", formatter_class=HelpFormatter,
        description="Pre-import the engine and wait for one claim (Unix socket, and HTTP with"
        " --port).")
    parser.add_argument("--socket", type=Path,
                        default=Path(os.environ.get("MOEFLOW_WARM_SOCKET", DEFAULT_SOCKET)),
                        help="where to listen for the claim (default: $MOEFLOW_WARM_SOCKET or"
                        f" {DEFAULT_SOCKET})")
    parser.add_argument("--port", type=int, default=None,
                        help="also take the claim as POST /v1/claim on this port, and serve the"
                        " engine there (default: no HTTP)")
    parser.add_argument("--host", default="0.0.0.0", help="HTTP address (with --port)")
    parser.add_argument("--claim-file", type=Path, default=None,
                        help="where the claim is kept for a restarted container (default:"
                        f" {CLAIM_FILE} next to --socket when --port is given)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.socket.parent.mkdir(parents=True, exist_ok=True)
    claim_file = args.claim_file or (
        args.socket.parent / CLAIM_FILE if args.port is not None else None)
    from moeflow.coldstart.warm_pool import worker_main

    return worker_main(args.socket, port=args.port, host=args.host, claim_file=claim_file)


if __name__ == "__main__":
    sys.exit(main())
