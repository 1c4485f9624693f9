"""LoRA adapters in PEFT's format, applied beside the base weights, several in one batch.

An adapter adds ``scale * B(A(x))`` to some linear layers (PEFT's unmerged LoRA:
``result = base(x) + lora_B(lora_A(x)) * scaling``). The engine fuses q/k/v into one product
and gate/up into another, so an adapter's parts are fused the same way: the parts' A matrices
are stacked ([sum r, in]) and each part's B sits in its own output rows and rank columns of
one [out, sum r] matrix (zeros elsewhere), which makes a fused layer's update one pair of
small products instead of one pair per part. The base products never change: they stay on
the packed kernels and the update is added to their output, per group of rows that share an
adapter (``LoraBatch``). Rows without an adapter cost nothing.

Only what the engine can apply exactly is accepted: plain LoRA (no DoRA, no per-module rank or
alpha patterns, no bias training, no ``modules_to_save``) on the attention and dense MLP
projections. Anything else is refused when the adapter loads, with what to change.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moeflow.engine.models.arch import ArchConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

SLOTS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0),
}
"""PEFT's module name (Llama-family naming) -> the engine's fused layer and the part in it."""

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """The adapter cannot be served as it is (the message says why and what to change)."""


@dataclass(frozen=True)
class LoraPair:
    a: torch.Tensor  # [R, in]: the parts' A matrices stacked
    b: torch.Tensor  # [out, R]: each part's B in its rows and rank columns


@dataclass(frozen=True)
class AdapterWeights:
    name: str
    scale: float
    rank: int
    pairs: dict[tuple[int, str], LoraPair]
    """(layer, fused layer name) -> its update; layers the adapter does not touch are absent."""
    nbytes: int


def _shapes(arch: ArchConfig) -> dict[str, tuple[int, list[int]]]:
    """fused layer -> (input features, output features of each part)."""
    hd, e = arch.head_dim, arch.hidden_size
    kv = arch.num_kv_heads * hd
    return {"qkv": (e, [arch.num_heads * hd, kv, kv]), "o_proj": (arch.num_heads * hd, [e]),
            "gate_up": (e, [arch.intermediate_size] * 2), "down": (arch.intermediate_size, [e])}


def lora_scale(config: dict[str, object]) -> tuple[int, float]:
    """The rank r and the update's scale (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    r = config.get("r")
    alpha = config.get("lora_alpha", r)
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, int | float):
        raise AdapterError(f"{CONFIG_FILE} needs an integer r >= 1 and a numeric lora_alpha")
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def check_config(config: dict[str, object]) -> None:
    """Refuse what the engine would not apply as PEFT does."""
    refused = [
        (config.get("peft_type", "LORA") != "LORA", "peft_type must be LORA"),
        (bool(config.get("use_dora")), "DoRA adapters (use_dora) are not served"),
        (bool(config.get("rank_pattern")) or bool(config.get("alpha_pattern")),
         "per-module rank_pattern/alpha_pattern are not served"),
        (config.get("bias", "none") != "none", "trained biases (bias != none) are not served"),
        (bool(config.get("modules_to_save")), "modules_to_save are not served"),
        (bool(config.get("fan_in_fan_out")), "fan_in_fan_out adapters are not served"),
    ]
    problems = [why for bad, why in refused if bad]
    if problems:
        raise AdapterError("; ".join(problems) + "; train a plain LoRA adapter")


def read_adapter(path: Path, name: str, arch: ArchConfig, dtype: torch.dtype) -> AdapterWeights:
    """Read and check a PEFT adapter folder against the base model's shapes."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path / CONFIG_FILE} cannot be read ({exc}); the adapter folder "
                           f"needs {CONFIG_FILE} and {WEIGHTS_FILE} as PEFT writes them") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path / CONFIG_FILE} is not a JSON object")
    check_config(config)
    rank, scale = lora_scale(config)
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path / WEIGHTS_FILE} cannot be read ({exc})") from None
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None or match.group(2) not in SLOTS:
            raise AdapterError(f"tensor {key!r} is not a LoRA update of a supported layer "
                               f"({', '.join(SLOTS)})")
        parts.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    return AdapterWeights(name, scale, rank, *_fuse(parts, arch, rank, dtype))


def _fuse(parts: dict[tuple[int, str], dict[str, torch.Tensor]], arch: ArchConfig, rank: int,
          dtype: torch.dtype) -> tuple[dict[tuple[int, str], LoraPair], int]:
    shapes = _shapes(arch)
    by_layer: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (layer, module), ab in sorted(parts.items()):
        if not 0 <= layer < arch.num_layers:
            raise AdapterError(f"the adapter has layer {layer}; the base model has "
                               f"{arch.num_layers}: it was trained on another model")
        slot, part = SLOTS[module]
        if slot in ("gate_up", "down") and layer in arch.moe_layer_ids:
            raise AdapterError(f"layer {layer} is a mixture-of-experts layer: adapters on its "
                               f"{module} are not served (target the attention projections)")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module} has lora_{''.join(ab)} only")
        a, b = ab["A"], ab["B"]
        in_features, outs = shapes[slot]
        if a.shape != (rank, in_features) or b.shape != (outs[part], rank):
            raise AdapterError(
                f"layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                f"do not fit the base model ([{rank}, {in_features}] and [{outs[part]}, "
                f"{rank}]): the adapter was trained on another model")
        by_layer.setdefault((layer, slot), {})[part] = (a, b)
    pairs: dict[tuple[int, str], LoraPair] = {}
    nbytes = 0
    for (layer, slot), present in by_layer.items():
        _, outs = shapes[slot]
        order = sorted(present)
        a = torch.cat([present[p][0] for p in order]).to(dtype).contiguous()
        b = torch.zeros(sum(outs), rank * len(order), dtype=dtype)
        for column, p in enumerate(order):
            row = sum(outs[:p])
            b[row : row + outs[p], column * rank : (column + 1) * rank] = present[p][1]
        pairs[(layer, slot)] = LoraPair(a, b)
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
    if not pairs:
        raise AdapterError("the adapter has no LoRA tensors")
    return pairs, nbytes


@dataclass(frozen=True)
class LoraGroup:
    weights: AdapterWeights
    rows: torch.Tensor | None
    """Row indices of the step's token batch that use it; None: every row."""


class LoraBatch:
    """One step's adapters: which rows of the token batch use which adapter."""

    def __init__(self, groups: list[LoraGroup]) -> None:
        self.groups = groups

    @classmethod
    def for_rows(cls, row_weights: list[AdapterWeights | None]) -> LoraBatch | None:
        """From each row's adapter (None: the base model); None when no row has one."""
        # by object, not name: an adapter unloaded while in use and one loaded again under its
        # name can both be in a step
        by_weights: dict[int, tuple[AdapterWeights, list[int]]] = {}
        for row, weights in enumerate(row_weights):
            if weights is not None:
                by_weights.setdefault(id(weights), (weights, []))[1].append(row)
        if not by_weights:
            return None
        groups = [LoraGroup(w, None if len(rows) == len(row_weights)
                            else torch.tensor(rows, dtype=torch.long))
                  for w, rows in by_weights.values()]
        return cls(groups)

    def add(self, layer: int, slot: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the base product of ``x``) plus each group's update on its rows, in place."""
        for group in self.groups:
            pair = group.weights.pairs.get((layer, slot))
            if pair is None:
                continue
            scale = group.weights.scale
            if group.rows is None:
                out.add_(F.linear(F.linear(x, pair.a), pair.b) * scale)
            else:
                update = F.linear(F.linear(x.index_select(0, group.rows), pair.a), pair.b)
                out.index_add_(0, group.rows, update * scale)
        return out
