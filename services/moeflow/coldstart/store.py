"""The node model store: models' weights kept in DRAM (/dev/shm) for instances to map.

An entry is a folder ``<root>/<key>/`` published atomically: written under ``<root>/.tmp-*``,
then renamed into place, so a reader sees a whole entry or none. ``entry.json`` holds its size,
whether it is pinned, and free-form metadata (what is in it is the writer's business; see
``snapshot.py``). Last use is the mtime of ``<key>/.used`` (touched on every ``get``, no lock).

Keep policy, within ``budget_bytes``: pinned entries (declared in the store's config or pinned
on the entry) are never evicted; the rest go least recently used first, and only as far as a
new entry needs room. An entry that cannot fit without evicting pinned ones is refused
(`StoreFullError`). Evicting an entry an instance has mapped is safe: on tmpfs the pages live
until the last mapping goes.

Writers serialise on ``flock(<root>/.lock)``. No torch here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_STORE_DIR = Path("/dev/shm/moeflow-store")
ENTRY_FILE = "entry.json"
USED_FILE = ".used"
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


class StoreFullError(RuntimeError):
    """An entry does not fit in the budget even after evicting every unpinned entry."""


@dataclass(frozen=True)
class StoreEntry:
    key: str
    path: Path
    size_bytes: int
    is_pinned: bool
    last_used_s: float
    """Unix time of the last ``get`` (or of the publish)."""
    meta: Mapping[str, Any] = field(default_factory=dict)


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"store key {key!r}: use letters, digits, '.', '_' and '-' only")
    return key


def plan_evictions(entries: Iterable[StoreEntry], budget_bytes: int, incoming_bytes: int,
                   *, pinned: Iterable[str] = ()) -> list[str]:
    """Keys to evict, oldest use first, so that ``incoming_bytes`` more fits the budget.

    Pure. Raises StoreFullError when even evicting every unpinned entry is not enough.
    """
    listed = list(entries)
    keep = set(pinned) | {e.key for e in listed if e.is_pinned}
    excess = sum(e.size_bytes for e in listed) + incoming_bytes - budget_bytes
    if excess <= 0:
        return []
    evicted: list[str] = []
    for entry in sorted((e for e in listed if e.key not in keep), key=lambda e: e.last_used_s):
        if excess <= 0:
            break
        evicted.append(entry.key)
        excess -= entry.size_bytes
    if excess > 0:
        pinned_bytes = sum(e.size_bytes for e in listed if e.key in keep)
        raise StoreFullError(
            f"{incoming_bytes} bytes do not fit the store budget of {budget_bytes} bytes: pinned "
            f"entries hold {pinned_bytes}; raise the budget or unpin a model"
        )
    return evicted


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ModelStore:
    """One node's store. ``pinned``: keys the node's config declares always kept."""

    def __init__(self, root: Path = DEFAULT_STORE_DIR, *, budget_bytes: int = 16 * 1024**3,
                 pinned: Iterable[str] = ()) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.root = root
        self.budget_bytes = budget_bytes
        self.pinned = frozenset(pinned)

    # -- reading ---------------------------------------------------------------------------
    def _read(self, path: Path) -> StoreEntry | None:
        try:
            raw = json.loads((path / ENTRY_FILE).read_text(encoding="utf-8"))
            last_used_s = (path / USED_FILE).stat().st_mtime
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        return StoreEntry(
            key=path.name, path=path, size_bytes=int(raw["size_bytes"]),
            is_pinned=bool(raw.get("pinned")) or path.name in self.pinned,
            last_used_s=last_used_s, meta=raw.get("meta") or {},
        )

    def entries(self) -> list[StoreEntry]:
        if not self.root.is_dir():
            return []
        found = (self._read(p) for p in sorted(self.root.iterdir()) if not p.name.startswith("."))
        return [e for e in found if e is not None]

    def peek(self, key: str) -> StoreEntry | None:
        """The entry without counting a use."""
        return self._read(self.root / check_key(key))

    def get(self, key: str) -> StoreEntry | None:
        """The entry, marked as just used (LRU), or None."""
        entry = self.peek(key)
        if entry is not None:
            with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: still mapped
                os.utime(entry.path / USED_FILE)
        return entry

    @property
    def used_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries())

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _clean_orphans(self) -> None:
        """Temp folders of writers that died mid-publish."""
        for path in [*self.root.glob(".tmp-*"), *self.root.glob(".old-*")]:
            pid = path.name.split("-")[1] if path.name.count("-") >= 2 else ""
            if not pid.isdigit() or not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)

    def _evict_for(self, key: str, incoming_bytes: int) -> list[str]:
        others = [e for e in self.entries() if e.key != key]
        victims = plan_evictions(others, self.budget_bytes, incoming_bytes, pinned=self.pinned)
        for victim in victims:
            self._remove(victim)
        return victims

    def _remove(self, key: str) -> bool:
        path = self.root / key
        if not path.exists():
            return False
        doomed = self.root / f".old-{os.getpid()}-{time.monotonic_ns()}-{key}"
        path.rename(doomed)  # readers stop seeing it at once; deletion may take a while
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def publish(self, key: str, write: Callable[[Path], Mapping[str, Any] | None], *,
                pinned: bool = False, expected_bytes: int = 0) -> StoreEntry:
        """Build an entry with ``write(tmp_dir)`` (returns its metadata), then swap it in.

        ``expected_bytes`` lets the store make room before writing (DRAM is the budget).
        Replaces an entry of the same key. Raises StoreFullError (nothing is left behind).
        """
        check_key(key)
        with self._locked():
            self._clean_orphans()
            if expected_bytes:
                self._evict_for(key, expected_bytes)
            tmp = self.root / f".tmp-{os.getpid()}-{time.monotonic_ns()}-{key}"
            tmp.mkdir()
            try:
                meta = write(tmp) or {}
                size_bytes = _folder_bytes(tmp)
                self._evict_for(key, size_bytes)
                record = {"key": key, "size_bytes": size_bytes, "pinned": pinned,
                          "created_unix": time.time(), "meta": dict(meta)}
                (tmp / ENTRY_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
                (tmp / USED_FILE).touch()
                self._remove(key)
                tmp.rename(self.root / key)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        entry = self.peek(key)
        assert entry is not None
        return entry

    def evict(self, key: str) -> bool:
        """Remove one entry (pinned or not); False if it was not there."""
        with self._locked():
            return self._remove(check_key(key))

    def set_pinned(self, key: str, pinned: bool) -> bool:
        with self._locked():
            path = self.root / check_key(key) / ENTRY_FILE
            if not path.exists():
                return False
            raw = json.loads(path.read_text(encoding="utf-8"))
            raw["pinned"] = pinned
            tmp = path.with_name(f".{ENTRY_FILE}.tmp")
            tmp.write_text(json.dumps(raw, indent=1), encoding="utf-8")
            tmp.rename(path)
            return True
