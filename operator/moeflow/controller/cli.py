"""`moeflow operator`: run the kopf operator in this process.

    moeflow operator [--namespace NS | --all-namespaces] [--standalone] [--liveness URL]

Equivalent to `kopf run -m moeflow.controller.main` with the same flags. Without
`--namespace`, the operator watches all namespaces (it then needs cluster-wide RBAC).
Without `--standalone`, kopf's peering is on and needs kopf's peering CRDs
(KopfPeering/ClusterKopfPeering) installed, so that two replicas never both act.
Operator settings come from MOEFLOW_OPERATOR_* variables (see `settings.py`).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `operator` subcommand to an argparse subparsers object; its `func(args)`
    runs the operator and returns the exit code."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "operator", help="run the Kubernetes operator (kopf) for moeflow.dev resources")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", help="watch only this namespace")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="watch every namespace (the default)")
    parser.add_argument("--standalone", action="store_true",
                        help="no peering: do not coordinate with other operator replicas")
    parser.add_argument("--liveness", default=None,
                        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import kopf

    # Importing the module registers the handlers in kopf's default registry.
    import moeflow.controller.main  # noqa: F401

    namespace: str | None = args.namespace
    kopf.run(
        clusterwide=namespace is None,
        namespaces=[namespace] if namespace else (),
        standalone=bool(args.standalone),
        liveness_endpoint=args.liveness,
    )
    return 0
