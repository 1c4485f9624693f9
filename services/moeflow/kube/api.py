"""The only module that talks to the Kubernetes API server: a small typed facade over the
official client's ApiClient (auth, TLS, retries are the client's), working on plain dicts.

Idempotency contract, which every reconcile relies on:
- `create` returns None on 409 (already there);
- `delete` returns False on 404 (already gone);
- `patch` returns None on 404, and raises `Conflict` on 409 (a patch that carries
  `metadata.resourceVersion` is an optimistic lock);
- `apply` = create, or on 409 read + patch only if the desired fields differ, and refuses to
  touch an object that another controller owns (`OwnershipConflict`).
Calls are blocking; async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

Obj = dict[str, Any]
Applied = Literal["created", "patched", "unchanged"]


@dataclass(frozen=True)
class Kind:
    api_version: str
    plural: str
    kind: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/api/{self.api_version}" if "/" not in self.api_version else (
            f"/apis/{self.api_version}")
        parts = [base]
        if self.namespaced and namespace is not None:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
        if subresource is not None:
            parts.append(subresource)
        return "/".join(parts)


POD = Kind("v1", "pods", "Pod")
SERVICE = Kind("v1", "services", "Service")
CONFIG_MAP = Kind("v1", "configmaps", "ConfigMap")
SERVICE_ACCOUNT = Kind("v1", "serviceaccounts", "ServiceAccount")
DEPLOYMENT = Kind("apps/v1", "deployments", "Deployment")
ROLE = Kind("rbac.authorization.k8s.io/v1", "roles", "Role")
ROLE_BINDING = Kind("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding")
SECRET = Kind("v1", "secrets", "Secret")
NETWORK_POLICY = Kind("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy")
MODEL = Kind("moeflow.dev/v1alpha1", "models", "Model")
ROLE_GROUP = Kind("moeflow.dev/v1alpha1", "rolegroups", "RoleGroup")
ENGINE_INSTANCE = Kind("moeflow.dev/v1alpha1", "engineinstances", "EngineInstance")
REQUEST = Kind("moeflow.dev/v1alpha1", "requests", "Request")
WARM_POOL = Kind("moeflow.dev/v1alpha1", "warmpools", "WarmPool")

_KINDS = {(k.api_version, k.kind): k for k in (
    POD, SERVICE, CONFIG_MAP, SERVICE_ACCOUNT, DEPLOYMENT, ROLE, ROLE_BINDING, MODEL, ROLE_GROUP,
    ENGINE_INSTANCE,
    REQUEST, WARM_POOL, SECRET, NETWORK_POLICY)}


def kind_of(obj: Mapping[str, Any]) -> Kind:
    try:
        return _KINDS[(obj["apiVersion"], obj["kind"])]
    except KeyError:
        raise ValueError(f"unknown kind {obj.get('apiVersion')}/{obj.get('kind')}") from None


class Conflict(Exception):
    """A patch carried `metadata.resourceVersion` and the object has moved on (409)."""


class OwnershipConflict(Exception):
    """An object with our deterministic name exists but another controller owns it."""


def is_subset(desired: Any, actual: Any) -> bool:
    """Whether every field of `desired` has the same value in `actual`. Lists must have equal
    length and match item by item (the server adds defaults inside list items)."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and is_subset(v, actual[k]) for k, v in desired.items())
    if isinstance(desired, list):
        return (isinstance(actual, list) and len(desired) == len(actual)
                and all(is_subset(d, a) for d, a in zip(desired, actual, strict=True)))
    return bool(desired == actual)


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return cast(str, ref.get("uid"))
    return None


def load_api_client(kubeconfig: str | None = None) -> k8s_client.ApiClient:
    """In-cluster service account when running in a Pod, else the kubeconfig (explicit path,
    $KUBECONFIG or ~/.kube/config). Never touches the client's global default configuration."""
    configuration = k8s_client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration, persist_config=False)
    return k8s_client.ApiClient(configuration)


class KubeApi:
    """Typed CRUD over the API server, dict in, dict out."""

    def __init__(self, api_client: k8s_client.ApiClient) -> None:
        self._client = api_client

    @classmethod
    def from_config(cls, kubeconfig: str | None = None) -> KubeApi:
        return cls(load_api_client(kubeconfig))

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]

    def _call(self, method: str, path: str, *, body: Any = None,
              query: Sequence[tuple[str, str]] = (), content_type: str = "application/json"
              ) -> Obj:
        request = self._client.param_serialize(
            method=method, resource_path=path, query_params=list(query),
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body, auth_settings=["BearerToken"],
        )
        response = self._client.call_api(*request)
        response.read()  # type: ignore[no-untyped-call]
        data = self._client.response_deserialize(response, {"2XX": "object"}).data
        return cast(Obj, data if isinstance(data, dict) else json.loads(response.data or b"{}"))

    def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        try:
            return self._call("GET", kind.path(namespace, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list(self, kind: Kind, namespace: str | None,
             labels: Mapping[str, str] | None = None) -> list[Obj]:
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in labels.items()))] if (
            labels) else []
        items = self._call("GET", kind.path(namespace), query=query).get("items") or []
        return [cast(Obj, item) for item in items]

    def create(self, obj: Mapping[str, Any]) -> Obj | None:
        kind = kind_of(obj)
        try:
            return self._call("POST", kind.path(obj["metadata"].get("namespace")), body=obj)
        except ApiException as e:
            if e.status == 409:
                return None
            raise

    def patch(self, kind: Kind, namespace: str, name: str, patch: Mapping[str, Any], *,
              subresource: str | None = None) -> Obj | None:
        try:
            return self._call("PATCH", kind.path(namespace, name, subresource), body=patch,
                              content_type="application/merge-patch+json")
        except ApiException as e:
            if e.status == 404:
                return None
            if e.status == 409:
                raise Conflict(f"{kind.kind} {name} changed meanwhile: {e.reason}") from e
            raise

    def patch_status(self, kind: Kind, namespace: str, name: str,
                     status: Mapping[str, Any]) -> Obj | None:
        return self.patch(kind, namespace, name, {"status": status}, subresource="status")

    def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        try:
            self._call("DELETE", kind.path(namespace, name),
                       body={"propagationPolicy": "Background"})
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def apply(self, desired: Mapping[str, Any]) -> Applied:
        """Create-or-patch with a deterministic name. Only the fields in `desired` (spec,
        labels, owner references...) are compared and patched; status is never touched."""
        if self.create(desired) is not None:
            return "created"
        meta = desired["metadata"]
        existing = self.get(kind_of(desired), meta["namespace"], meta["name"])
        if existing is None:  # deleted between our 409 and our read: the next event retries
            return "created" if self.create(desired) is not None else "unchanged"
        return self._patch_if_changed(desired, existing)

    def apply_known(self, desired: Mapping[str, Any], existing: Mapping[str, Any] | None
                    ) -> Applied:
        """`apply` when the caller has just listed the object (None: it was not there),
        which saves a create that would 409 and a read per object."""
        if existing is None:
            return "created" if self.create(desired) is not None else self.apply(desired)
        return self._patch_if_changed(desired, existing)

    def _patch_if_changed(self, desired: Mapping[str, Any], existing: Mapping[str, Any]
                          ) -> Applied:
        kind, meta = kind_of(desired), desired["metadata"]
        owner, ours = controller_uid(existing), controller_uid(desired)
        if owner is not None and ours is not None and owner != ours:
            raise OwnershipConflict(
                f"{kind.kind} {meta['name']} exists and is controlled by another owner"
                f" (uid {owner}); rename or delete it")
        patch = {k: v for k, v in desired.items() if k not in ("status", "apiVersion", "kind")}
        if is_subset(patch, existing):
            return "unchanged"
        self.patch(kind, meta["namespace"], meta["name"], patch)
        return "patched"
