"""`upcycle(source_dir, out_dir, spec)`: turn a dense Llama-family checkpoint into a MoE one.

Sparse upcycling (Komatsuzaki et al., 2022): every MLP becomes a top-k mixture of experts that
all start as copies of it, plus a fresh router. Target: Mixtral (`model_type` "mixtral"), hub
layout `model.layers.{i}.block_sparse_moe.gate.weight` (router) and
`...block_sparse_moe.experts.{e}.{w1,w2,w3}.weight` (gate, down, up). Why Mixtral: Llama's
attention (no biases, no QK-norm), experts of the dense `intermediate_size`, top-k weights
always renormalised (`norm_topk_prob: true` is written too, for readers that look), every layer
MoE, tied embeddings honoured; transformers and the engine run the same ops on it. qwen3_moe
needs q_norm/k_norm (Llama has none), and transformers' qwen2_moe always builds a shared expert.

Contract:
- Source: a dir with config.json (`model_type` "llama" or "mistral", `hidden_act` "silu", no
  attention or MLP biases) and `*.safetensors` weights; else `UpcycleError`.
- Every non-MLP tensor is copied unchanged (same dtype); a tied `lm_head.weight` is not written.
  Expert e of layer i is the dense MLP of layer i plus N(0, perturb_std^2) noise (none when
  perturb_std == 0). The router [E, hidden] is N(0, router_std^2), router_std defaulting to the
  source's `initializer_range` (else 0.02). Router draws come from `torch.Generator` seeded
  `seed`, noise from one seeded `seed + 1`: the same spec gives byte-identical weights, and the
  router does not depend on perturb_std.
- Unperturbed, a token's MoE output is sum_j w_j * MLP(x) with sum_j w_j = 1: the dense output
  up to rounding (the weighted sum; expert matmuls over token subsets). Greedy tokens match the
  dense model's (max |logit diff|: 2.6e-6 tiny-llama, 7.3e-5 SmolLM2). router_std == 0 sends
  every token to the same experts with weights of exactly 1/top_k (E a power of two, top_k 1
  or 2): logits bit-identical to the dense model's.
- Writes config.json, model.safetensors (or model-0000i-of-0000N.safetensors shards of at most
  `max_shard_bytes` plus model.safetensors.index.json), the source's other top-level files
  (tokenizer, chat template, generation config, ...) byte for byte, and moeflow.json (source
  "upcycle:<source name>"). The recipe is in each shard's safetensors metadata under
  "moeflow.upcycle".
- Atomic: written into a temp dir next to out_dir and renamed into place; an out_dir that exists
  and is not empty is refused before any work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeflow.checkpoints.metadata import METADATA_FILENAME, read_metadata, write_metadata

ProgressFn = Callable[[str, float], None]
TARGET_MODEL_TYPE = "mixtral"
SOURCE_MODEL_TYPES = ("llama", "mistral")
INDEX_FILENAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2**30  # safetensors copies a shard to bytes when it writes it
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_NOT_COPIED = {"config.json", INDEX_FILENAME, METADATA_FILENAME}
# dense MLP projection -> Mixtral expert name (w1 gate, w3 up, w2 down)
_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_MLP_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight")
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
# transformers' Llama/Mistral defaults that Mixtral's differ from, for configs that omit them
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_SOURCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_parameters": _ROPE},
    "mistral": {"rms_norm_eps": 1e-6, "sliding_window": 4096, "rope_parameters": _ROPE},
}
# source config keys that are Llama-only or describe the dense model, not the MoE one
_DROPPED_KEYS = {"model_type", "architectures", "transformers_version", "attention_bias",
                 "mlp_bias", "pretraining_tp", "_name_or_path"}


class UpcycleError(ValueError):
    """The source cannot be upcycled, the spec is invalid, or the output dir is taken."""


@dataclass(frozen=True)
class UpcycleSpec:
    num_experts: int = 8
    top_k: int = 2
    perturb_std: float = 0.0
    """Std of the Gaussian noise added to every expert weight (absolute, not relative)."""
    seed: int = 0
    router_std: float | None = None
    """Std of the router init; None: the source's initializer_range (else 0.02)."""

    def validate(self) -> None:
        if self.num_experts < 1:
            raise UpcycleError(f"--experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise UpcycleError(f"--top-k must be in [1, {self.num_experts}], got {self.top_k}")
        if self.perturb_std < 0 or (self.router_std is not None and self.router_std < 0):
            raise UpcycleError("--perturb and --router-std must be >= 0")


def default_upcycled_name(source_name: str, spec: UpcycleSpec) -> str:
    """The default model name: ("smollm2-135m-instruct", 8 experts, top-2) ->
    "smollm2-135m-instruct-moe8x2"."""
    return f"{source_name}-moe{spec.num_experts}x{spec.top_k}"


def _report(progress: ProgressFn | None, stage: str, fraction: float) -> None:
    if progress is not None:
        progress(stage, fraction)


def _read_source_config(source_dir: Path) -> dict[str, Any]:
    try:
        raw = json.loads((source_dir / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise UpcycleError(f"{source_dir} has no readable config.json: {error}") from None
    model_type = raw.get("model_type")
    if model_type not in SOURCE_MODEL_TYPES:
        raise UpcycleError(
            f"cannot upcycle model_type {model_type!r}; supported: {', '.join(SOURCE_MODEL_TYPES)}"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise UpcycleError(f"hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise UpcycleError("attention or MLP biases have no place in a Mixtral checkpoint")
    if int(raw.get("pretraining_tp") or 1) != 1:
        raise UpcycleError("pretraining_tp != 1 is not supported")
    return dict(raw)


def target_config(source: dict[str, Any], spec: UpcycleSpec) -> dict[str, Any]:
    """The MoE config.json as a dict: the source's keys (minus dense-only ones) + MoE keys."""
    config = {k: v for k, v in source.items() if k not in _DROPPED_KEYS}
    for key, value in _SOURCE_DEFAULTS[source["model_type"]].items():
        if key not in config and not (key == "rope_parameters" and "rope_theta" in config):
            config[key] = value
    config.update(
        model_type=TARGET_MODEL_TYPE,
        architectures=["MixtralForCausalLM"],
        num_local_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        norm_topk_prob=True,
        output_router_logits=False,
        router_jitter_noise=0.0,
        tie_word_embeddings=bool(source.get("tie_word_embeddings", False)),
    )
    return dict(sorted(config.items()))


def _tensors(
    source_dir: Path, config: dict[str, Any], spec: UpcycleSpec
) -> Iterator[tuple[str, torch.Tensor, float]]:
    """(name, tensor, progress fraction) of the MoE checkpoint, in a fixed order."""
    num_layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    router_std = spec.router_std
    if router_std is None:
        router_std = float(config.get("initializer_range") or 0.02)
    router_gen = torch.Generator().manual_seed(spec.seed)
    noise_gen = torch.Generator().manual_seed(spec.seed + 1)
    routed: set[int] = set()

    def layer_of(key: str) -> int:
        match = _LAYER_KEY.match(key)
        return int(match.group(1)) if match else (-1 if "embed" in key else num_layers)

    with ExitStack() as stack:
        handles: dict[str, Any] = {}
        for path in sorted(source_dir.glob("*.safetensors")):
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            handles.update(dict.fromkeys(handle.keys(), handle))  # noqa: SIM118 - not a mapping
        for layer in range(num_layers):
            for proj in _EXPERT_NAMES:
                if f"model.layers.{layer}.mlp.{proj}.weight" not in handles:
                    raise UpcycleError(f"layer {layer} has no dense mlp.{proj} to upcycle")
        for key in sorted(handles, key=lambda k: (layer_of(k), k)):
            if config["tie_word_embeddings"] and key == "lm_head.weight":
                continue
            tensor: torch.Tensor = handles[key].get_tensor(key)
            fraction = (layer_of(key) + 1) / (num_layers + 1)
            match = _MLP_KEY.fullmatch(key)
            if match is None:
                yield key, tensor, fraction
                continue
            layer, proj = int(match.group(1)), match.group(2)
            prefix = f"model.layers.{layer}.block_sparse_moe"
            if layer not in routed:  # one router per layer, drawn in layer order
                routed.add(layer)
                router = torch.randn(spec.num_experts, hidden, generator=router_gen) * router_std
                yield f"{prefix}.gate.weight", router.to(tensor.dtype), fraction
            for expert in range(spec.num_experts):
                if spec.perturb_std > 0:
                    noise = torch.randn(tensor.shape, generator=noise_gen) * spec.perturb_std
                    weight = (tensor.float() + noise).to(tensor.dtype)
                else:  # each expert its own storage: safetensors refuses shared tensors
                    weight = tensor.clone()
                yield f"{prefix}.experts.{expert}.{_EXPERT_NAMES[proj]}.weight", weight, fraction


def _write_shards(
    tensors: Iterator[tuple[str, torch.Tensor, float]],
    out_dir: Path,
    metadata: dict[str, str],
    max_shard_bytes: int,
    progress: ProgressFn | None,
) -> int:
    """Write shards of at most max_shard_bytes (a bigger single tensor gets its own shard);
    return the number of parameters written."""
    shard: dict[str, torch.Tensor] = {}
    shard_of: dict[str, int] = {}
    paths: list[Path] = []
    num_params = total_bytes = shard_bytes = decile = 0

    def flush() -> None:
        paths.append(out_dir / f".shard-{len(paths)}.safetensors")
        save_file(shard, str(paths[-1]), metadata=metadata)
        shard.clear()

    for name, tensor, fraction in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            _report(progress, f"writing shard {len(paths) + 1}", 0.9 * fraction)
            flush()
            shard_bytes = 0
        if int(fraction * 10) > decile:
            decile = int(fraction * 10)
            _report(progress, "copying layers into experts", 0.9 * fraction)
        shard[name], shard_of[name] = tensor.contiguous(), len(paths)
        shard_bytes += nbytes
        num_params += tensor.numel()
        total_bytes += nbytes
    _report(progress, "writing the last shard", 0.9)
    flush()
    finals = [f"model-{i + 1:05d}-of-{len(paths):05d}.safetensors" for i in range(len(paths))]
    if len(paths) == 1:
        finals = ["model.safetensors"]
    else:
        weight_map = {name: finals[i] for name, i in sorted(shard_of.items())}
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out_dir / INDEX_FILENAME).write_text(json.dumps(index, indent=2) + "\n")
    for path, final in zip(paths, finals, strict=True):
        path.chmod(0o644)  # safetensors creates files 0600; other users must read the cache
        path.rename(out_dir / final)
    return num_params


def estimated_output_bytes(source_dir: Path, spec: UpcycleSpec) -> int:
    """About how many bytes the upcycled weights take: the source's, plus (experts - 1) more
    copies of every layer's MLP at the source's bytes per parameter (0: cannot tell)."""
    from moeflow.checkpoints.store import safetensors_num_params

    try:
        raw = json.loads((source_dir / "config.json").read_text())
        hidden, inter = int(raw["hidden_size"]), int(raw["intermediate_size"])
        layers = int(raw["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    source_bytes = sum(p.stat().st_size for p in source_dir.glob("*.safetensors"))
    source_params = safetensors_num_params(source_dir)
    if not source_params:
        return 0
    per_param = source_bytes / source_params
    return int(source_bytes + (spec.num_experts - 1) * layers * 3 * hidden * inter * per_param)


def upcycle(
    source_dir: Path,
    out_dir: Path,
    spec: UpcycleSpec,
    *,
    name: str | None = None,
    progress: ProgressFn | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the upcycled MoE checkpoint of source_dir into out_dir (see module docstring)."""
    spec.validate()
    source = _read_source_config(source_dir)
    if not any(source_dir.glob("*.safetensors")):
        raise UpcycleError(f"{source_dir} has no *.safetensors weights")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UpcycleError(f"{out_dir} already exists; remove it or choose another --out/--name")
    source_meta = read_metadata(source_dir)
    source_name = source_meta.name if source_meta else source_dir.name
    config = target_config(source, spec)
    recipe = {"source": source_name, **asdict(spec)}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp_dir.mkdir()
    try:
        stage = f"upcycling {source_name}: {spec.num_experts} experts, top-{spec.top_k}"
        _report(progress, stage, 0.0)
        shard_metadata = {"format": "pt", "moeflow.upcycle": json.dumps(recipe, sort_keys=True)}
        tensors = _tensors(source_dir, config, spec)
        num_params = _write_shards(tensors, temp_dir, shard_metadata, max_shard_bytes, progress)
        (temp_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for path in sorted(source_dir.iterdir()):
            copied = path.name not in _NOT_COPIED and not path.name.endswith(_WEIGHT_SUFFIXES)
            if path.is_file() and copied:
                shutil.copyfile(path, temp_dir / path.name)
        write_metadata(
            temp_dir,
            name=name or out_dir.name,
            source=f"upcycle:{source_name}",
            architecture=TARGET_MODEL_TYPE,
            num_params=num_params,
        )
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory
        temp_dir.rename(out_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    _report(progress, f"{out_dir.name} is ready at {out_dir}", 1.0)
    return out_dir
