"""What an instance needs before its KV cache: config, tokenizer and weights, from wherever.

``Preloaded`` is handed to ``LLMEngine`` so the engine skips loading; the weights come from the
node store (mapped), the checkpoint folder (read and converted), a parent process (fork) or a
live peer (XCCL). Every path ends in the same ``DecoderModel``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from moeflow.coldstart.snapshot import DTYPES, is_compatible, read_snapshot, store_key
from moeflow.coldstart.store import ModelStore
from moeflow.domain.coldstart import WeightsSource
from moeflow.engine.config import EngineSettings
from moeflow.engine.models.arch import ArchConfig, load_arch
from moeflow.engine.models.loader import load_model
from moeflow.engine.preloaded import Preloaded
from moeflow.text.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 8192


def rope_len(settings: EngineSettings, arch: ArchConfig) -> int:
    """RoPE positions to precompute: at least what the engine's context can reach."""
    return settings.max_model_len or min(arch.max_position_embeddings, DEFAULT_MAX_LEN)


def preload(settings: EngineSettings, store: ModelStore | None = None) -> Preloaded:
    """From the store when it holds a compatible snapshot of this model, else the checkpoint."""
    started = time.monotonic()
    model_dir = settings.model_path
    entry = store.get(store_key(settings.name, settings.dtype)) if store is not None else None
    if entry is not None and not is_compatible(dict(entry.meta), settings.dtype):
        logger.warning("store entry %s was written by another engine layout; loading %s",
                       entry.key, model_dir)
        entry = None
    source: WeightsSource = "checkpoint"
    if entry is not None:
        model_dir = entry.path
        source = "store"
    arch = load_arch(model_dir)
    tokenizer = TextTokenizer.from_dir(model_dir)
    if entry is not None:
        model = read_snapshot(entry.path, arch, max_len=rope_len(settings, arch))
    else:
        model = load_model(model_dir, arch, dtype=DTYPES[settings.dtype],
                           max_len=rope_len(settings, arch))
    return Preloaded(arch, tokenizer, model, source, time.monotonic() - started)


def store_from(path: Path | None) -> ModelStore | None:
    """The store an engine reads (no budget applies to readers)."""
    return ModelStore(path) if path is not None else None
