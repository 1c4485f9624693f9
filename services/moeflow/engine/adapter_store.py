"""The LoRA adapters one engine instance knows, the ones it holds in memory, and their budget.

An adapter is *known* once loaded (by name, from its folder); its weights are *resident* while
they fit the memory budget (``EngineOptions.lora_memory_bytes``). Loading one that does not fit
evicts the least recently used resident adapters that no request uses; an evicted adapter stays
known and is read again from its folder by its next request. An adapter in use is never
evicted, and unloading one in use only stops new requests: its weights go when its last
request ends.

Thread-safety: the HTTP side loads, unloads and lists; the engine thread acquires and
releases. One lock guards the tables; file reads happen outside it except for a re-read of an
evicted adapter, which the engine thread needs before its step anyway.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence, Set
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from moeflow.domain.errors import (
    BackendUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    MoeflowError,
    OverloadedError,
)
from moeflow.domain.roles import Role
from moeflow.engine.config import EngineSettings
from moeflow.engine.lora import AdapterError, AdapterWeights, LoraBatch, LoraGroup, read_adapter
from moeflow.engine.models.arch import ArchConfig
from moeflow.engine.models.decoder import DecoderModel

logger = logging.getLogger(__name__)

Reader = Callable[[Path, str], AdapterWeights]
"""Reads (and checks) an adapter folder; ``lora.read_adapter`` bound to the model."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def choose_evictions(
    lru: Sequence[tuple[int, int]], in_use: Set[int], need_bytes: int, budget_bytes: int
) -> list[int] | None:
    """Which resident adapters to evict so that ``need_bytes`` more fit ``budget_bytes``.

    ``lru`` is (id, bytes) of the resident adapters, least recently used first. Returns the
    ids to evict (the fewest, oldest first, skipping those in use), or None when the adapters
    in use leave too little room."""
    used = sum(nbytes for _, nbytes in lru)
    chosen: list[int] = []
    for uid, nbytes in lru:
        if used + need_bytes <= budget_bytes:
            break
        if uid not in in_use:
            chosen.append(uid)
            used -= nbytes
    return chosen if used + need_bytes <= budget_bytes else None


@dataclass(frozen=True)
class KnownAdapter:
    uid: int
    name: str
    path: Path


class AdapterStore:
    def __init__(self, reader: Reader, *, budget_bytes: int, base_name: str) -> None:
        self._read = reader
        self.budget_bytes = budget_bytes
        self._base_name = base_name
        self._lock = threading.Lock()
        self._known: dict[str, KnownAdapter] = {}
        self._resident: OrderedDict[int, AdapterWeights] = OrderedDict()  # oldest first
        self._in_use: Counter[int] = Counter()
        self._next_uid = 1

    # -- HTTP side -------------------------------------------------------------------------
    def names(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(self._known))

    def resident_names(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(w.name for uid, w in self._resident.items()
                                if self._is_known(uid)))

    def describe(self) -> list[dict[str, object]]:
        with self._lock:
            return [{"name": k.name, "path": str(k.path), "resident": k.uid in self._resident,
                     "in_use": self._in_use[k.uid],
                     "bytes": self._resident[k.uid].nbytes if k.uid in self._resident else None}
                    for k in sorted(self._known.values(), key=lambda k: k.name)]

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._known

    def load(self, name: str, path: Path) -> KnownAdapter:
        """Read an adapter and make it known and resident (evicting idle ones if needed)."""
        if not _NAME.match(name) or name == self._base_name:
            raise InvalidRequestError(
                f"adapter name {name!r} must be 1-128 letters, digits, '.', '_' or '-' and "
                f"differ from the base model's name {self._base_name!r}", param="name")
        with self._lock:
            known = self._known.get(name)
        if known is not None:
            if known.path == path:
                return known  # loading the same folder again is a no-op
            raise InvalidRequestError(f"an adapter named {name!r} is already loaded from "
                                      f"{known.path}; unload it first", param="name")
        weights = self._checked_read(path, name, InvalidRequestError)
        with self._lock:
            if name in self._known:
                raise InvalidRequestError(f"an adapter named {name!r} was loaded meanwhile",
                                          param="name")
            known = KnownAdapter(self._next_uid, name, path)
            self._next_uid += 1
            self._make_room(weights, InvalidRequestError)
            self._known[name] = known
            self._resident[known.uid] = weights
            return known

    def unload(self, name: str) -> None:
        with self._lock:
            known = self._known.pop(name, None)
            if known is None:
                raise ModelNotFoundError(f"no adapter named {name!r} is loaded", param="name")
            if not self._in_use[known.uid]:
                self._resident.pop(known.uid, None)

    # -- engine thread ---------------------------------------------------------------------
    def acquire(self, name: str) -> int:
        """Mark one more request of the adapter in use, reading it back if it was evicted."""
        with self._lock:
            known = self._known.get(name)
            if known is None:
                raise ModelNotFoundError(f"the adapter {name!r} is not loaded on this instance",
                                         param="model")
            if known.uid in self._resident:
                self._resident.move_to_end(known.uid)
            else:
                weights = self._checked_read(known.path, name, OverloadedError)
                self._make_room(weights, OverloadedError)
                self._resident[known.uid] = weights
            self._in_use[known.uid] += 1
            return known.uid

    def release(self, uid: int) -> None:
        with self._lock:
            self._in_use[uid] -= 1
            if self._in_use[uid] <= 0:
                del self._in_use[uid]
                if not self._is_known(uid):  # unloaded while in use
                    self._resident.pop(uid, None)

    def weights(self, uid: int) -> AdapterWeights:
        """An adapter in use (resident by construction)."""
        return self._resident[uid]

    # -- helpers (lock held) ---------------------------------------------------------------
    def _is_known(self, uid: int) -> bool:
        return any(k.uid == uid for k in self._known.values())

    def _checked_read(self, path: Path, name: str, error: type[MoeflowError]) -> AdapterWeights:
        try:
            return self._read(path, name)
        except AdapterError as exc:
            if error is OverloadedError:  # a request's read-back: no server paths to clients
                logger.error("adapter %r could not be read again from %s: %s", name, path, exc)
                raise BackendUnavailableError(
                    f"the adapter {name!r} could not be read again on this instance") from None
            raise error(f"adapter {name!r} from {path}: {exc}", param="path") from None

    def _make_room(self, weights: AdapterWeights, error: type[MoeflowError]) -> None:
        lru = [(uid, w.nbytes) for uid, w in self._resident.items()]
        evict = choose_evictions(lru, set(self._in_use), weights.nbytes, self.budget_bytes)
        if evict is None:
            mib = 1024 * 1024
            raise error(
                f"adapter {weights.name!r} needs {weights.nbytes / mib:.1f} MiB; the LoRA memory "
                f"budget is {self.budget_bytes / mib:.1f} MiB and adapters in use hold the rest "
                "(raise lora_memory_bytes, or retry when they are idle)")
        for uid in evict:
            del self._resident[uid]


def build_store(settings: EngineSettings, arch: ArchConfig, dtype: torch.dtype) -> AdapterStore:
    """The engine's store, with ``settings.lora_adapters`` loaded (a bad adapter stops the
    start with its reason)."""
    store = AdapterStore(lambda path, name: read_adapter(path, name, arch, dtype),
                         budget_bytes=settings.lora_memory_bytes, base_name=settings.name)
    if settings.lora_adapters and settings.role in (Role.ATTENTION, Role.EXPERT):
        raise ValueError("LoRA adapters are served by colocated, prefill and decode instances, "
                         f"not by the {settings.role} role")
    for name, path in settings.lora_adapters.items():
        try:
            store.load(name, path)
        except MoeflowError as exc:
            raise ValueError(exc.message) from None
    return store


@contextmanager
def adapter_applied(model: DecoderModel, store: AdapterStore, adapter_id: int) -> Iterator[None]:
    """``model`` computes with adapter ``adapter_id`` (0: none) on every row: a forward outside
    a step (prompt logprobs, a split request's first-token logprob)."""
    if adapter_id:
        model.lora = LoraBatch([LoraGroup(store.weights(adapter_id), None)])
    try:
        yield
    finally:
        model.lora = None
