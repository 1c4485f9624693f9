"""Fixtures: the emulated API server (kmock + shim) over real HTTP, a kubeconfig pointing at
it for both kopf and the operator's own client, and the real operator."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import AsyncIterator

import kmock
import kubernetes
import pytest
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from cluster_kit import Cluster, OperatorRunner  # noqa: E402
from crd_schema import CRD_DIR, CrdValidator, load_crds  # noqa: E402
from kube_emulator import ClusterEmulator  # noqa: E402


@pytest.fixture(scope="session")
def crd_validator() -> CrdValidator:
    return CrdValidator(load_crds())


@pytest.fixture
async def cluster(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                  crd_validator: CrdValidator) -> AsyncIterator[Cluster]:
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
        monkeypatch.setenv("MOEFLOW_OPERATOR_BATCH_PROGRESS_INTERVAL_S", "0.1")
        monkeypatch.setenv("MOEFLOW_OPERATOR_RETRY_BACKOFF_S", "0.2")
        yield Cluster(emulator, server.client, crd_validator)


@pytest.fixture
async def operator(cluster: Cluster) -> AsyncIterator[OperatorRunner]:
    runner = OperatorRunner()
    await runner.start()
    yield runner
    await runner.stop()
