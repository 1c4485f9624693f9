"""The LRU choice of adapters to evict (pure)."""

from __future__ import annotations

from moeflow.engine.adapter_store import choose_evictions


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
