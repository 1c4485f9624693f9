"""Fixtures for FineTunes on the emulated cluster: the controller tests' emulator, shim and
operator runner (tests/integration/controller), a kubeconfig that the operator and a trainer
subprocess both use, and a kubelet stand-in that runs a trainer Pod's real command."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import AsyncIterator

import kmock
import kubernetes
import pytest
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "controller"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from cluster_kit import Cluster, OperatorRunner  # noqa: E402
from crd_schema import CRD_DIR, CrdValidator, load_crds  # noqa: E402
from kube_emulator import ClusterEmulator  # noqa: E402
from trainer_kubelet import FineTuneCluster  # noqa: E402


@pytest.fixture(scope="session")
def crd_validator() -> CrdValidator:
    return CrdValidator(load_crds())


@pytest.fixture
async def cluster(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                  crd_validator: CrdValidator) -> AsyncIterator[FineTuneCluster]:
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
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                            str(kubeconfig))
        monkeypatch.setenv("MOEFLOW_OPERATOR_KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("MOEFLOW_OPERATOR_RETRY_BACKOFF_S", "0.2")
        yield FineTuneCluster(Cluster(emulator, server.client, crd_validator), kubeconfig,
                              tmp_path / "node")


@pytest.fixture
async def operator(cluster: FineTuneCluster) -> AsyncIterator[OperatorRunner]:
    runner = OperatorRunner()
    await runner.start()
    yield runner
    await runner.stop()
