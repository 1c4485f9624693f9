"""Pure builder of the identity a per-Model process reads the API server with: a
ServiceAccount, a namespaced Role with exactly the given rules, and the RoleBinding between
them, all three named after the process (`<model>-gateway`, `<model>-balancer`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Obj = dict[str, Any]


def build_service_account_rbac(name: str, namespace: str, labels: Mapping[str, str],
                               rules: Sequence[Obj]) -> list[Obj]:
    """ServiceAccount, Role and RoleBinding, in apply order."""
    meta = {"name": name, "namespace": namespace, "labels": dict(labels)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": dict(meta),
         "rules": list(rules)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": dict(meta),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
    ]
