"""Fixtures for FineTunes on the emulated cluster: the controller tests' emulator, shim and
operator runner (tests/integration/controller), a kubeconfig that the operator and a trainer
subprocess both use, and a kubelet stand-in that runs a trainer Pod's real command."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import AsyncIterator

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "controller"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from cluster_kit import OperatorRunner  # noqa: E402
from crd_schema import CrdValidator, load_crds  # noqa: E402
from emulated_api import emulated_api  # noqa: E402
from trainer_kubelet import FineTuneCluster  # noqa: E402


@pytest.fixture(scope="session")
def crd_validator() -> CrdValidator:
    return CrdValidator(load_crds())


@pytest.fixture
async def cluster(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                  crd_validator: CrdValidator) -> AsyncIterator[FineTuneCluster]:
    async with emulated_api(tmp_path, monkeypatch, crd_validator) as (cluster, kubeconfig):
        yield FineTuneCluster(cluster, kubeconfig, tmp_path / "node")


@pytest.fixture
async def operator(cluster: FineTuneCluster) -> AsyncIterator[OperatorRunner]:
    runner = OperatorRunner()
    await runner.start()
    yield runner
    await runner.stop()
