"""Fixtures: the emulated API server (kmock + shim) over real HTTP with a kubeconfig for kopf
and the operator's own client (emulated_api.py), and the real operator."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import AsyncIterator

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from cluster_kit import Cluster, OperatorRunner  # noqa: E402
from crd_schema import CrdValidator, load_crds  # noqa: E402
from emulated_api import emulated_api  # noqa: E402


@pytest.fixture(scope="session")
def crd_validator() -> CrdValidator:
    return CrdValidator(load_crds())


@pytest.fixture
async def cluster(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                  crd_validator: CrdValidator) -> AsyncIterator[Cluster]:
    async with emulated_api(tmp_path, monkeypatch, crd_validator) as (cluster, _):
        monkeypatch.setenv("MOEFLOW_OPERATOR_BATCH_PROGRESS_INTERVAL_S", "0.1")
        yield cluster


@pytest.fixture
async def operator(cluster: Cluster) -> AsyncIterator[OperatorRunner]:
    runner = OperatorRunner()
    await runner.start()
    yield runner
    await runner.stop()
