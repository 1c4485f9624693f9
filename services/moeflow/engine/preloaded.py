"""What an instance needs before its KV cache, already in memory: handed to ``LLMEngine`` so the
engine skips loading. ``moeflow.coldstart.preload`` fills it from the node store, the checkpoint,
a parent process (fork) or a live peer (XCCL).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeflow.domain.coldstart import WeightsSource
from moeflow.engine.models.arch import ArchConfig
from moeflow.engine.models.decoder import DecoderModel
from moeflow.text.tokenizer import TextTokenizer


@dataclass
class Preloaded:
    arch: ArchConfig
    tokenizer: TextTokenizer
    model: DecoderModel
    weights_source: WeightsSource
    load_s: float
    """Seconds this process spent getting the weights (0 for a forked child)."""
