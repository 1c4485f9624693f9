"""Pure builders of what keeps a Model's engines to themselves: the internal token Secret,
the env entry that hands it to a container, and the engines' NetworkPolicy. Dicts in, dicts
out; no I/O (the token itself is drawn by the caller, `reconcile_model`).

Internal token (`<model>-internal-token`, key `token`): engines accept work only with the
header `x-moeflow-internal-token` equal to their MOEFLOW_INTERNAL_TOKEN (health and /metrics
stay open); the Model's gateway and expert balancer send it. The Secret is created once, if
absent, and never patched: a reconcile must not rotate a token that running Pods already
hold (env from a Secret is read at container start). It is `immutable`, so the API server
refuses any change, and owned by the Model, so it goes with it.

NetworkPolicy (`<model>-engines`), one per Model from the operator rather than in the chart:
the rules name the Model (its gateway, its engines, its balancer), which only the operator
knows, and the policy is owned by the Model like everything else. Ingress to the Model's
engine Pods (claimed warm Pods too: they carry the same labels) is allowed from
- engines of the same Model, on every port (KV pulls between prefill and decode, expert
  exchange; a transport that opens another port keeps working);
- the Model's gateway, its expert balancer and the operator (cold-start report, /v1/stats,
  warm claims), on the engine port only.
Everything else is dropped where the CNI enforces NetworkPolicy. Policies are additive: the
chart's shared gateway gets its own allow rule in the release namespace.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from moeflow.controller.settings import OperatorSettings
from moeflow.domain import naming

Obj = dict[str, Any]

# The label every namespace carries (API server, since 1.21): selects one namespace by name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
ENGINE_PORT_NAME = "http"


def build_internal_token_secret(model: str, namespace: str, token: str) -> Obj:
    """The Model's internal token Secret, holding `token` (drawn by the caller)."""
    return {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": naming.internal_token_secret_name(model), "namespace": namespace,
                     "labels": naming.model_labels(model, naming.COMPONENT_INTERNAL_TOKEN)},
        "type": "Opaque",
        "immutable": True,
        "data": {naming.INTERNAL_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def existing_secret_problem(secret: Mapping[str, Any], model_uid: str) -> str | None:
    """Why an existing `<model>-internal-token` cannot serve the Model (None: it can). One made
    by hand (no controller) is used as it is: that is how several Models share one token (a
    shared gateway in front of them sends only one)."""
    meta = secret["metadata"]
    owner = next((r for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
    if owner is not None and owner.get("uid") != model_uid:
        return (f"Secret {meta['name']} exists and is controlled by another owner"
                f" ({owner.get('kind')} {owner.get('name')}); rename or delete it")
    if not (secret.get("data") or {}).get(naming.INTERNAL_TOKEN_KEY):
        return (f"Secret {meta['name']} has no key {naming.INTERNAL_TOKEN_KEY!r}: engines,"
                " gateway and balancer cannot start; delete it and the operator makes one")
    return None


def token_of(secret: Mapping[str, Any] | None) -> str | None:
    """The token a `<model>-internal-token` Secret holds (None: no Secret, or no token)."""
    encoded = ((secret or {}).get("data") or {}).get(naming.INTERNAL_TOKEN_KEY)
    if not encoded:
        return None
    try:
        return base64.b64decode(encoded, validate=True).decode() or None
    except (ValueError, UnicodeDecodeError):
        return None


def internal_token_env(model: str) -> Obj:
    """The container env entry that reads the Model's token from its Secret. Not optional:
    a Pod waits (CreateContainerConfigError) rather than start without it."""
    return {"name": naming.INTERNAL_TOKEN_ENV,
            "valueFrom": {"secretKeyRef": {"name": naming.internal_token_secret_name(model),
                                           "key": naming.INTERNAL_TOKEN_KEY}}}


def operator_peer(settings: OperatorSettings) -> Obj:
    """The operator's Pods as a NetworkPolicy peer: in its own namespace when known."""
    namespaces: Obj = ({"matchLabels": {NAMESPACE_NAME_LABEL: settings.namespace}}
                       if settings.namespace else {})
    return {"namespaceSelector": namespaces,
            "podSelector": {"matchLabels": naming.operator_selector()}}


def build_engines_network_policy(model: str, namespace: str, settings: OperatorSettings
                                 ) -> Obj:
    engine_port = [{"port": ENGINE_PORT_NAME, "protocol": "TCP"}]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": naming.engines_network_policy_name(model), "namespace": namespace,
                     "labels": naming.model_labels(model, naming.COMPONENT_ENGINE)},
        "spec": {
            "podSelector": {"matchLabels": naming.engine_selector(model)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": naming.engine_selector(model)}}]},
                {"from": [{"podSelector": {"matchLabels": naming.gateway_selector(model)}},
                          {"podSelector": {"matchLabels": naming.balancer_selector(model)}},
                          operator_peer(settings)],
                 "ports": engine_port},
            ],
        },
    }
