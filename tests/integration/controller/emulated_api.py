"""The emulated API server (kmock + the CRD-aware shim) over real HTTP, and a kubeconfig that
points kopf, the operator's own client and any subprocess at it."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import kmock
import kubernetes
import pytest
import yaml
from cluster_kit import Cluster
from crd_schema import CRD_DIR, CrdValidator
from kube_emulator import ClusterEmulator


@asynccontextmanager
async def emulated_api(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                       crd_validator: CrdValidator
                       ) -> AsyncIterator[tuple[Cluster, pathlib.Path]]:
    """A fresh emulated cluster with the CRDs declared; yields it and its kubeconfig path."""
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.declare_crds(CRD_DIR)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator",
                          "cluster": {"server": str(server.url).rstrip("/")}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "emulator",
                          "context": {"cluster": "emulator", "user": "test"}}],
        }))
        # kopf logs in through the kubernetes client's default kubeconfig location, which the
        # client reads from $KUBECONFIG at import time; the operator's own client uses this.
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                            str(kubeconfig))
        monkeypatch.setenv("MOEFLOW_OPERATOR_KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("MOEFLOW_OPERATOR_RETRY_BACKOFF_S", "0.2")
        yield Cluster(emulator, server.client, crd_validator), kubeconfig
