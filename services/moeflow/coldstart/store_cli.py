"""``moeflow store add|list|evict|pin|unpin|agent``: the node model store from the command line.

``agent`` runs the node's store agent (`store_agent.py`): it keeps the Models that declare
``dramPreload`` pinned in this store until they stop declaring it.

``main(argv)`` parses its own arguments so the top-level CLI can delegate to it as is.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from moeflow.checkpoints.cli import HelpFormatter, format_size_bytes, render_table
from moeflow.coldstart.store import DEFAULT_STORE_DIR, ModelStore, StoreFullError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeflow store", formatter_class=HelpFormatter,
                                     description="node model store (weights in DRAM)")
    parser.add_argument("--dir", type=Path,
                        default=Path(os.environ.get("MOEFLOW_STORE_DIR") or DEFAULT_STORE_DIR),
                        help="the store's folder (default: %(default)s; env MOEFLOW_STORE_DIR)")
    parser.add_argument("--budget-gb", type=float,
                        default=float(os.environ.get("MOEFLOW_STORE_BUDGET_GB") or 16),
                        help="most memory the store may use, in GiB (default: %(default)s; env "
                        "MOEFLOW_STORE_BUDGET_GB)")
    parser.add_argument("--pinned", action="append", default=[], metavar="KEY",
                        help="keys the node always keeps (repeatable; default: none)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = sub.add_parser("add", help="convert a model to the engine layout and keep it here")
    add.add_argument("model", help="cached model name or checkpoint folder")
    add.add_argument("--name", default="", help="served model name (default: the folder's)")
    add.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                     help="weights dtype in the store (part of its key)")
    add.add_argument("--pin", action="store_true", help="never evict it")
    sub.add_parser("list", help="entries, most recently used first")
    evict = sub.add_parser("evict", help="remove entries")
    evict.add_argument("keys", nargs="+", metavar="KEY", help="store keys (see `list`)")
    for name, what in (("pin", "never evict these entries"), ("unpin", "allow evicting them")):
        sub.add_parser(name, help=what).add_argument("keys", nargs="+", metavar="KEY",
                                                     help="store keys (see `list`)")
    agent = sub.add_parser("agent", help="keep the Models that declare dramPreload pinned here")
    agent.add_argument("--namespace", default=os.environ.get("MOEFLOW_STORE_AGENT_NAMESPACE"),
                       help="list Models in this namespace only (default: every namespace; env "
                       "MOEFLOW_STORE_AGENT_NAMESPACE)")
    agent.add_argument("--models-dir", type=Path, default=None,
                       help="disk model store holding store://NAME checkpoints as NAME/ "
                            "(default: $MOEFLOW_HOME/models)")
    agent.add_argument("--dtype", choices=["float32", "bfloat16"],
                       default=os.environ.get("MOEFLOW_STORE_AGENT_DTYPE") or "float32",
                       help="the engines' dtype, part of the store key (default: %(default)s; "
                       "env MOEFLOW_STORE_AGENT_DTYPE)")
    agent.add_argument("--interval-s", type=float,
                       default=float(os.environ.get("MOEFLOW_STORE_AGENT_INTERVAL_S") or 30),
                       help="seconds between two syncs (default: %(default)s; env "
                       "MOEFLOW_STORE_AGENT_INTERVAL_S)")
    agent.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                       help="outside a cluster only (default: KUBECONFIG, else the service "
                       "account or ~/.kube/config)")
    agent.add_argument("--once", action="store_true", help="sync once and exit")
    for action in parser._actions:  # the subcommands show their defaults the same way
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.formatter_class = HelpFormatter
    return parser


def _run_agent(args: argparse.Namespace, store: ModelStore) -> int:
    from moeflow.checkpoints.store import models_dir, resolve_home
    from moeflow.coldstart.store_agent import KubeModelLister, StoreAgent

    if args.interval_s <= 0:
        sys.stderr.write(f"error: --interval-s must be > 0, got {args.interval_s}\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    lister = KubeModelLister(args.namespace, kubeconfig=args.kubeconfig)
    agent = StoreAgent(store, lister, args.models_dir or models_dir(resolve_home(os.environ)),
                       dtype=args.dtype, interval_s=args.interval_s)
    try:
        if args.once:
            agent.sync_once()
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        agent.run(stop)
    finally:
        lister.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = ModelStore(args.dir, budget_bytes=int(args.budget_gb * 1024**3), pinned=args.pinned)
    out = sys.stdout
    if args.command == "agent":
        return _run_agent(args, store)
    if args.command == "add":
        from moeflow.checkpoints.store import resolve_home, resolve_model
        from moeflow.coldstart.snapshot import store_key, write_snapshot

        model_dir = resolve_model(args.model, resolve_home(os.environ))
        name = args.name or args.model.rstrip("/").split("/")[-1]
        expected = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        try:
            entry = store.publish(
                store_key(name, args.dtype),
                lambda dest: write_snapshot(model_dir, dest, dtype=args.dtype),
                pinned=args.pin, expected_bytes=expected)
        except StoreFullError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 1
        out.write(f"{entry.key}\t{format_size_bytes(entry.size_bytes)}\t{entry.path}\n")
    elif args.command == "list":
        rows = [("KEY", "SIZE", "PINNED", "SOURCE")] + [
            (e.key, format_size_bytes(e.size_bytes), "yes" if e.is_pinned else "-",
             str(e.meta.get("source", "")))
            for e in sorted(store.entries(), key=lambda e: -e.last_used_s)]
        out.write(render_table(rows))
        out.write(f"used {format_size_bytes(store.used_bytes)} of "
                  f"{format_size_bytes(store.budget_bytes)}\n")
    elif args.command == "evict":
        missing = [k for k in args.keys if not store.evict(k)]
        if missing:
            sys.stderr.write(f"not in the store: {', '.join(missing)}\n")
            return 1
    else:
        missing = [k for k in args.keys if not store.set_pinned(k, args.command == "pin")]
        if missing:
            sys.stderr.write(f"not in the store: {', '.join(missing)}\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
