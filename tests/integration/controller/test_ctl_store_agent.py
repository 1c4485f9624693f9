"""`KubeModelLister` (the node store agent's view of Models) against the emulated API server:
the same contract as the test double the agent's own tests use (tests/fake_model_lister.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from cluster_kit import Cluster

from moeflow.coldstart.store_agent import KubeModelLister
from tests.fake_model_lister import CONTRACT_MODELS, FakeModelLister, check_lister_contract


def test_the_fake_lister_meets_the_contract() -> None:
    check_lister_contract(lambda ns: FakeModelLister(CONTRACT_MODELS, namespace=ns))


async def test_the_kubernetes_lister_meets_the_contract(cluster: Cluster) -> None:
    for obj in CONTRACT_MODELS:
        await cluster.apply(obj)
    listers: list[KubeModelLister] = []

    def lister_for(namespace: str | None) -> Any:
        listers.append(KubeModelLister(namespace))
        return listers[-1]

    try:
        await asyncio.to_thread(check_lister_contract, lister_for)
    finally:
        for lister in listers:
            lister.close()


async def test_a_defaulted_model_declares_nothing(cluster: Cluster) -> None:
    created = await cluster.apply(CONTRACT_MODELS[1])
    assert created["spec"]["dramPreload"] is False  # the CRD default
