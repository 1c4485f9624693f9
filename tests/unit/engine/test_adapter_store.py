"""The LRU choice of adapters to evict (pure), the adapter settings, and row grouping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from moeflow.engine.adapter_store import choose_evictions
from moeflow.engine.config import EngineOptions
from moeflow.engine.lora import AdapterWeights, LoraBatch, LoraPair


def test_nothing_evicted_when_it_fits() -> None:
    assert choose_evictions([(1, 10), (2, 10)], set(), 10, 30) == []


def test_oldest_idle_go_first_and_only_as_many_as_needed() -> None:
    lru = [(1, 10), (2, 10), (3, 10)]
    assert choose_evictions(lru, set(), 10, 30) == [1]
    assert choose_evictions(lru, set(), 20, 30) == [1, 2]
    assert choose_evictions(lru, {1}, 10, 30) == [2]


def test_adapters_in_use_are_never_evicted() -> None:
    assert choose_evictions([(1, 10), (2, 10)], {1, 2}, 5, 20) is None
    assert choose_evictions([(1, 10)], set(), 25, 20) is None  # larger than the budget


def test_lora_flags_reach_engine_children_through_the_environment(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    options = EngineOptions(lora_adapters=["toy=/adapters/toy", "b=/x=y"],
                            lora_memory_bytes=1 << 20)
    assert options.lora_adapters == {"toy": Path("/adapters/toy"), "b": Path("/x=y")}
    for name, value in options.as_env().items():
        if value is not None:
            monkeypatch.setenv(name, value)
    assert EngineOptions() == options  # what `moeflow up` hands each engine process
    with pytest.raises(ValidationError, match="NAME=PATH"):
        EngineOptions(lora_adapters=["no-path"])


def test_rows_are_grouped_by_adapter_object_not_name() -> None:
    def weights(value: float) -> AdapterWeights:
        pair = LoraPair(torch.ones(1, 2), torch.full((2, 1), value))
        return AdapterWeights("same-name", 1.0, 1, {(0, "o_proj"): pair}, 0)

    old, new = weights(1.0), weights(10.0)  # unloaded while in use, then loaded again
    batch = LoraBatch.for_rows([old, None, new])
    assert batch is not None and len(batch.groups) == 2
    out = batch.add(0, "o_proj", torch.ones(3, 2), torch.zeros(3, 2))
    assert out.tolist() == [[2.0, 2.0], [0.0, 0.0], [20.0, 20.0]]
    assert LoraBatch.for_rows([None, None]) is None
