"""Node model store policy: budget, pinning, LRU eviction, atomic publish; the cold-start record."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from moeflow.coldstart.store import ModelStore, StoreEntry, StoreFullError, plan_evictions
from moeflow.domain.coldstart import ColdStartRecord, process_start_monotonic


def entry(key: str, size: int, used: float, pinned: bool = False) -> StoreEntry:
    return StoreEntry(key=key, path=Path(key), size_bytes=size, is_pinned=pinned, last_used_s=used)


def writer(num_bytes: int, meta: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    def write(dest: Path) -> dict[str, str]:
        (dest / "weights.bin").write_bytes(b"\0" * num_bytes)
        return meta or {}

    return write


def test_nothing_is_evicted_while_the_budget_holds() -> None:
    assert plan_evictions([entry("a", 40, 1), entry("b", 40, 2)], 100, 20) == []


def test_least_recently_used_go_first_and_only_as_far_as_needed() -> None:
    entries = [entry("new", 30, 9), entry("old", 30, 1), entry("mid", 30, 5)]
    assert plan_evictions(entries, 100, 30) == ["old"]
    assert plan_evictions(entries, 100, 60) == ["old", "mid"]


def test_pinned_entries_are_never_evicted() -> None:
    entries = [entry("pinned", 50, 0, pinned=True), entry("declared", 30, 1), entry("x", 20, 2)]
    assert plan_evictions(entries, 100, 20, pinned={"declared"}) == ["x"]
    with pytest.raises(StoreFullError, match="pinned"):
        plan_evictions(entries, 100, 60, pinned={"declared"})


def test_publish_is_atomic_and_a_failed_writer_leaves_nothing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, budget_bytes=1000)

    def failing(dest: Path) -> None:
        (dest / "partial").write_bytes(b"x" * 10)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        store.publish("m--float32", failing)
    assert store.entries() == []
    assert [p.name for p in tmp_path.iterdir() if p.name != ".lock"] == []
    published = store.publish("m--float32", writer(100, {"dtype": "float32"}))
    assert published.size_bytes >= 100 and published.meta == {"dtype": "float32"}
    replaced = store.publish("m--float32", writer(200))
    assert [e.key for e in store.entries()] == ["m--float32"]
    assert replaced.size_bytes >= 200


def test_publish_evicts_the_least_recently_used_to_fit(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, budget_bytes=2500, pinned={"keep"})
    for key in ("keep", "a", "b"):
        store.publish(key, writer(700))
    old = time.time() - 100
    for key in ("keep", "a", "b"):
        os.utime(tmp_path / key / ".used", (old, old))
    assert store.get("a") is not None  # a is now the most recently used
    store.publish("c", writer(700))
    assert sorted(e.key for e in store.entries()) == ["a", "c", "keep"]
    with pytest.raises(StoreFullError):
        store.publish("huge", writer(5000))
    assert store.peek("huge") is None


def test_pin_evict_and_orphan_cleanup(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, budget_bytes=1500)
    store.publish("a", writer(700), pinned=True)
    store.publish("b", writer(700))
    orphan = tmp_path / ".tmp-999999999-1-a"  # a writer that died mid-publish
    orphan.mkdir()
    with pytest.raises(StoreFullError):  # b can go, a is pinned, c does not fit beside a
        store.publish("c", writer(900))
    assert not orphan.exists()
    assert store.set_pinned("a", False)
    store.publish("c", writer(700))
    assert sorted(e.key for e in store.entries()) == ["b", "c"]
    assert store.evict("b") and not store.evict("b")
    with pytest.raises(ValueError, match="store key"):
        store.get("../etc")


def test_record_seconds_are_non_negative_and_map_to_task_status() -> None:
    record = ColdStartRecord(started_s=time.monotonic())
    assert record.as_dict()["preload_seconds"] is None
    record.mark_load_started()
    record.mark_load_done()
    record.mark_ready()
    assert record.mark_first_token() and not record.mark_first_token()
    body = record.as_dict()
    assert set(body["task_status"]) == {"enginePreloadSeconds", "weightLoadSeconds",
                                        "postLoadSeconds", "firstRoutedRequestSeconds"}
    assert all(v >= 0 for v in body["task_status"].values())


def test_process_start_comes_from_the_launcher_or_the_kernel() -> None:
    assert process_start_monotonic({"MOEFLOW_LAUNCH_MONOTONIC": "12.5"}) == 12.5
    started = process_start_monotonic({})
    assert 0 <= time.monotonic() - started < 24 * 3600  # this test process started earlier
