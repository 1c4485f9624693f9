"""``moeflow store agent``: keeps one node's DRAM store in line with the Models that declare it.

Every ``interval_s`` the agent lists Models (one namespace or all) and, for each one with
``spec.dramPreload: true`` and a ``store://NAME`` source, makes sure the node's store holds a
current snapshot of ``NAME`` (from the disk model store, ``<models_dir>/NAME``, where
``moeflow models pull`` puts it) under the engine's key ``<model name>--<dtype>``, pinned.
An entry it pinned whose Model no longer declares it is unpinned, then ages out by LRU within
the budget like any other entry ("declared in the Model, plus recently used").

The agent owns only the pins it set, recorded in ``<store>/.agent-pins.json``: a pin set by
hand (``moeflow store pin``) or by the node's config (``--pinned``) is never undone.

- `declared_entries` and `plan_sync` are pure (Models in, store actions out).
- `ModelLister` is how Models are read; `KubeModelLister` reads them from the API server.
- `StoreAgent.sync_once` applies one plan; `run` loops until stopped. A failed list changes
  nothing (the store is left as it is, pins included) until a list succeeds.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from moeflow.coldstart.store import ModelStore, StoreEntry, StoreFullError
from moeflow.kube import api as kube
from moeflow.kube.api import KubeApi

logger = logging.getLogger(__name__)

AGENT_PINS_FILE = ".agent-pins.json"
STORE_SCHEME = "store://"

Convert = Callable[[Path, Path, str], Mapping[str, Any]]
"""(checkpoint dir, entry dir, dtype) -> the entry's metadata (`snapshot.write_snapshot`)."""


@dataclass(frozen=True)
class Action:
    kind: Literal["add", "pin", "unpin"]
    key: str
    checkpoint: str = ""
    """`add` only: the name under the disk model store to convert."""


class ModelLister(Protocol):
    def list_models(self) -> list[Mapping[str, Any]]:
        """Model objects as the API server returns them; raises when they cannot be read."""
        ...


class KubeModelLister:
    """Models of one namespace (None: every namespace), read with one LIST per call."""

    def __init__(self, namespace: str | None = None, *, api: KubeApi | None = None,
                 kubeconfig: str | None = None) -> None:
        self.namespace = namespace
        self._api = api if api is not None else KubeApi.from_config(kubeconfig)

    def list_models(self) -> list[Mapping[str, Any]]:
        return list(self._api.list(kube.MODEL, self.namespace))

    def close(self) -> None:
        self._api.close()


def _store_key(model_name: str, dtype: str) -> str:
    return f"{model_name}--{dtype}"  # = snapshot.store_key, without importing torch


def declared_entries(models: Iterable[Mapping[str, Any]], dtype: str) -> dict[str, str]:
    """Store key -> checkpoint name, for each Model that declares ``dramPreload`` and whose
    source is ``store://NAME``. The key is the engine's (served name = Model name), so two
    Models of one name in different namespaces share it: the first by namespace wins."""
    declared: dict[str, str] = {}
    ordered = sorted(models, key=lambda m: (str((m.get("metadata") or {}).get("namespace", "")),
                                            str((m.get("metadata") or {}).get("name", ""))))
    for model in ordered:
        meta, spec = model.get("metadata") or {}, model.get("spec") or {}
        uri = str((spec.get("source") or {}).get("uri", ""))
        if meta.get("deletionTimestamp") or spec.get("dramPreload") is not True:
            continue
        if not uri.startswith(STORE_SCHEME) or not meta.get("name"):
            continue
        key = _store_key(str(meta["name"]), dtype)
        checkpoint = uri.removeprefix(STORE_SCHEME).strip("/")
        if declared.setdefault(key, checkpoint) != checkpoint:
            logger.warning("Model %s/%s: store key %s already declared for %s; skipped",
                           meta.get("namespace"), meta["name"], key, declared[key])
    return declared


def plan_sync(declared: Mapping[str, str], entries: Iterable[StoreEntry],
              agent_pins: AbstractSet[str], *, layout: str,
              available: AbstractSet[str]) -> list[Action]:
    """What makes the store hold every declared entry pinned, and release the rest.

    - declared, missing or of another engine layout, checkpoint ``available`` on the node:
      ``add`` (converted and published pinned);
    - declared, current, not pinned: ``pin``; already pinned (by anyone): nothing;
    - pinned by the agent (``agent_pins``) and no longer declared: ``unpin`` (also when the
      entry is gone, so the agent forgets it).
    """
    by_key = {e.key: e for e in entries}
    actions: list[Action] = []
    for key, checkpoint in sorted(declared.items()):
        entry = by_key.get(key)
        if entry is None or entry.meta.get("layout") != layout:
            if checkpoint in available:
                actions.append(Action("add", key, checkpoint))
        elif not entry.is_pinned:
            actions.append(Action("pin", key))
    actions += [Action("unpin", key) for key in sorted(set(agent_pins) - set(declared))]
    return actions


def _convert_snapshot(model_dir: Path, dest: Path, dtype: str) -> Mapping[str, Any]:
    from moeflow.coldstart.snapshot import write_snapshot

    return write_snapshot(model_dir, dest, dtype=dtype)


def _layout() -> str:
    from moeflow.coldstart.snapshot import layout_fingerprint

    return layout_fingerprint()


class StoreAgent:
    """Applies `plan_sync` to one node's store, every ``interval_s`` seconds."""

    def __init__(self, store: ModelStore, lister: ModelLister, models_dir: Path, *,
                 dtype: str = "float32", interval_s: float = 30.0,
                 convert: Convert = _convert_snapshot, layout: str | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.store = store
        self.lister = lister
        self.models_dir = models_dir
        self.dtype = dtype
        self.interval_s = interval_s
        self._convert = convert
        self._layout = layout

    @property
    def layout(self) -> str:
        if self._layout is None:
            self._layout = _layout()
        return self._layout

    def agent_pins(self) -> set[str]:
        try:
            raw = json.loads((self.store.root / AGENT_PINS_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return set()
        return {str(k) for k in raw} if isinstance(raw, list) else set()

    def _save_pins(self, pins: set[str]) -> None:
        self.store.root.mkdir(parents=True, exist_ok=True)
        tmp = self.store.root / f"{AGENT_PINS_FILE}.tmp"
        tmp.write_text(json.dumps(sorted(pins)), encoding="utf-8")
        tmp.rename(self.store.root / AGENT_PINS_FILE)

    def _available(self, declared: Mapping[str, str]) -> set[str]:
        return {name for name in declared.values()
                if (self.models_dir / name / "config.json").is_file()}

    def sync_once(self) -> list[Action]:
        """One round: list, plan, apply. Returns the plan. Raises if the list fails."""
        declared = declared_entries(self.lister.list_models(), self.dtype)
        available = self._available(declared)
        for key, name in declared.items():
            if name not in available:
                logger.warning("%s: checkpoint %s is not in %s (pull it first)", key, name,
                               self.models_dir)
        pins = self.agent_pins()
        actions = plan_sync(declared, self.store.entries(), pins, layout=self.layout,
                            available=available)
        for action in actions:
            try:
                self._apply(action)
            except StoreFullError as e:
                logger.warning("%s: not kept: %s", action.key, e)
                continue
            except Exception:  # one broken checkpoint must not block the others
                logger.exception("%s: %s failed", action.key, action.kind)
                continue
            if action.kind == "unpin":
                pins.discard(action.key)
            else:
                pins.add(action.key)
            logger.info("%s %s", action.kind, action.key)
        self._save_pins(pins)
        return actions

    def _apply(self, action: Action) -> None:
        if action.kind == "add":
            model_dir = self.models_dir / action.checkpoint
            expected = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
            self.store.publish(action.key,
                               lambda dest: self._convert(model_dir, dest, self.dtype),
                               pinned=True, expected_bytes=expected)
        else:
            self.store.set_pinned(action.key, action.kind == "pin")

    def run(self, stop: threading.Event) -> None:
        """Sync now, then every ``interval_s``, until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.sync_once()
            except Exception as e:  # an API hiccup: keep the store as it is, retry later
                logger.warning("store sync failed, store left as it is: %s", e)
            stop.wait(self.interval_s)
