"""The node store agent: which Models' weights a node keeps pinned in DRAM (pure plan), and the
loop against the Model lister's test double, a real store and a tiny checkpoint."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from moeflow.coldstart.preload import preload, store_from
from moeflow.coldstart.store import ModelStore, StoreEntry
from moeflow.coldstart.store_agent import (
    AGENT_PINS_FILE,
    Action,
    StoreAgent,
    declared_entries,
    plan_sync,
)
from moeflow.coldstart.store_cli import build_parser
from moeflow.engine.config import EngineSettings
from tests.fake_model_lister import FakeModelLister, model

LAYOUT = "layout-1"


def entry(key: str, *, pinned: bool = False, layout: str = LAYOUT) -> StoreEntry:
    return StoreEntry(key=key, path=Path(key), size_bytes=1, is_pinned=pinned, last_used_s=0,
                      meta={"layout": layout})


def test_only_store_sources_that_declare_dram_preload_are_declared() -> None:
    models = [model("a", "store://ckpt-a", dram_preload=True),
              model("b", "store://ckpt-b", dram_preload=False),
              model("c", "store://ckpt-c"),
              model("d", "pvc://claim/d", dram_preload=True),
              model("e", "file:///weights/e", dram_preload=True)]
    gone = model("f", "store://ckpt-f", dram_preload=True)
    gone["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    assert declared_entries([*models, gone], "bfloat16") == {"a--bfloat16": "ckpt-a"}


def test_one_name_in_two_namespaces_shares_the_engine_key_first_namespace_wins() -> None:
    models = [model("m", "store://two", dram_preload=True, namespace="team-b"),
              model("m", "store://one", dram_preload=True, namespace="team-a")]
    assert declared_entries(models, "float32") == {"m--float32": "one"}


def test_missing_or_stale_declared_entries_are_added_when_their_checkpoint_is_here() -> None:
    declared = {"a--float32": "ca", "b--float32": "cb", "c--float32": "cc"}
    entries = [entry("b--float32", layout="old")]
    actions = plan_sync(declared, entries, set(), layout=LAYOUT, available={"ca", "cb"})
    assert actions == [Action("add", "a--float32", "ca"), Action("add", "b--float32", "cb")]


def test_declared_entries_get_pinned_unless_someone_pinned_them_already() -> None:
    declared = {"a--float32": "ca", "b--float32": "cb"}
    entries = [entry("a--float32"), entry("b--float32", pinned=True)]
    assert plan_sync(declared, entries, set(), layout=LAYOUT, available=set()) == [
        Action("pin", "a--float32")]


def test_only_the_agents_own_pins_are_released_when_no_longer_declared() -> None:
    entries = [entry("mine", pinned=True), entry("by-hand", pinned=True)]
    actions = plan_sync({}, entries, {"mine", "evicted-meanwhile"}, layout=LAYOUT,
                        available=set())
    assert actions == [Action("unpin", "evicted-meanwhile"), Action("unpin", "mine")]


def test_a_store_in_line_with_the_declarations_needs_nothing() -> None:
    declared = {"a--float32": "ca"}
    entries = [entry("a--float32", pinned=True), entry("lru", pinned=False)]
    assert plan_sync(declared, entries, {"a--float32"}, layout=LAYOUT, available={"ca"}) == []


def test_the_cli_parses_the_agent_flags() -> None:
    args = build_parser().parse_args(["--dir", "/s", "--budget-gb", "2", "agent",
                                      "--namespace", "ns", "--interval-s", "5", "--once"])
    assert (args.command, args.namespace, args.interval_s, args.once) == ("agent", "ns", 5.0,
                                                                         True)
    assert args.dtype == "float32"  # the engine's default: the store key must match it


@pytest.fixture
def world(tiny_dirs: dict[str, Path], tmp_path: Path) -> tuple[StoreAgent, FakeModelLister]:
    checkpoint = tiny_dirs["llama"]
    lister = FakeModelLister([model("m", f"store://{checkpoint.name}", dram_preload=True)])
    store = ModelStore(tmp_path / "store", budget_bytes=1024**3)
    return StoreAgent(store, lister, checkpoint.parent, interval_s=0.01), lister


def test_a_declared_model_is_converted_pinned_and_mapped_by_an_engine(
        world: tuple[StoreAgent, FakeModelLister], tiny_dirs: dict[str, Path]) -> None:
    agent, _ = world
    (action,) = agent.sync_once()
    assert action == Action("add", "m--float32", tiny_dirs["llama"].name)
    stored = agent.store.peek("m--float32")
    assert stored is not None and stored.is_pinned
    assert agent.agent_pins() == {"m--float32"}
    assert agent.sync_once() == []  # in line: no second conversion

    # The engine of that Model (served name m, default dtype) maps it from the store.
    settings = EngineSettings(model_path=tiny_dirs["llama"], served_model_name="m")
    assert preload(settings, store_from(agent.store.root)).weights_source == "store"


def test_an_undeclared_model_is_unpinned_and_left_to_lru(
        world: tuple[StoreAgent, FakeModelLister]) -> None:
    agent, lister = world
    agent.sync_once()
    lister.models[0]["spec"]["dramPreload"] = False
    assert agent.sync_once() == [Action("unpin", "m--float32")]
    stored = agent.store.peek("m--float32")
    assert stored is not None and not stored.is_pinned  # kept until the budget needs room
    assert agent.agent_pins() == set()


def test_a_hand_pin_survives_the_agent(world: tuple[StoreAgent, FakeModelLister]) -> None:
    agent, lister = world
    lister.models.clear()
    agent.store.publish("by-hand", lambda dest: {"layout": "x"}, pinned=True)
    assert agent.sync_once() == []
    stored = agent.store.peek("by-hand")
    assert stored is not None and stored.is_pinned


def test_a_failed_list_leaves_the_store_as_it_is(
        world: tuple[StoreAgent, FakeModelLister]) -> None:
    agent, lister = world
    agent.sync_once()
    lister.fail_next = True
    with pytest.raises(ConnectionError):
        agent.sync_once()
    assert (agent.store.root / AGENT_PINS_FILE).exists() and agent.agent_pins() == {"m--float32"}
    stored = agent.store.peek("m--float32")
    assert stored is not None and stored.is_pinned


def test_a_missing_checkpoint_or_failed_conversion_does_not_stop_the_loop(
        tmp_path: Path) -> None:
    calls: list[str] = []

    def convert(model_dir: Path, dest: Path, dtype: str) -> dict[str, Any]:
        calls.append(model_dir.name)
        raise RuntimeError("bad checkpoint")

    models_dir = tmp_path / "models"
    (models_dir / "broken").mkdir(parents=True)
    (models_dir / "broken" / "config.json").write_text("{}")
    lister = FakeModelLister([model("a", "store://broken", dram_preload=True),
                              model("b", "store://not-pulled", dram_preload=True)])
    lister.fail_next = True  # the first round fails to list; the loop goes on
    agent = StoreAgent(ModelStore(tmp_path / "store"), lister, models_dir, interval_s=0.01,
                       convert=convert, layout=LAYOUT)
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,))
    runner.start()
    try:
        for _ in range(500):
            if len(calls) >= 2:
                break
            stop.wait(0.01)
    finally:
        stop.set()
        runner.join(timeout=5)
    assert calls[:2] == ["broken", "broken"] and not runner.is_alive()
    assert agent.store.entries() == [] and agent.agent_pins() == set()
