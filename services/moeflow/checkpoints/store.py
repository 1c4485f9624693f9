"""The local model cache: where checkpoints live, listing them, resolving a name to a dir.

Contract:
- The cache root ("home") is $MOEFLOW_HOME, else ~/.cache/moeflow. `resolve_home` takes the
  environment as a mapping and reads nothing else (HOME comes from that mapping when present).
- A cached model is `<home>/models/<name>/` holding at least config.json; names starting with
  "." are in-progress temp dirs and are never listed or resolved.
- `resolve_model` accepts an existing directory containing config.json (used as is) or a cached
  model name; anything else raises `ModelNotCachedError`, whose message says how to get one.
- No torch / transformers imports here: the gateway and the CLI can use this module cheaply.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path

from moeflow.checkpoints.metadata import read_metadata
from moeflow.checkpoints.registry import PULLABLE

HOME_ENV_VAR = "MOEFLOW_HOME"
CONFIG_FILENAME = "config.json"


class ModelNotCachedError(FileNotFoundError):
    """A model name or path that is neither a checkpoint dir nor in the cache."""


@dataclass(frozen=True)
class CachedModel:
    name: str
    """Directory name under `<home>/models/`."""
    path: Path
    """The checkpoint directory."""
    architecture: str
    """config.json `model_type` ("unknown" if absent)."""
    num_params: int
    """Unique parameter count, from moeflow.json or else the safetensors headers."""
    size_bytes: int
    """Total size of all files in the directory, in bytes."""


def resolve_home(env: Mapping[str, str]) -> Path:
    """The cache root: env["MOEFLOW_HOME"] if set and non-empty, else ~/.cache/moeflow."""
    configured = env.get(HOME_ENV_VAR, "")
    if configured:
        return Path(configured).expanduser()
    user_home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return user_home / ".cache" / "moeflow"


def models_dir(home: Path) -> Path:
    """`<home>/models`, where each cached model has its own directory."""
    return home / "models"


def safetensors_num_params(checkpoint_dir: Path) -> int:
    """Sum of tensor element counts over every *.safetensors file, from the headers only."""
    total = 0
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        with path.open("rb") as handle:
            (header_len_bytes,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len_bytes))
        total += sum(prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
    return total


def _dir_size_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def _architecture(checkpoint_dir: Path) -> str:
    try:
        config = json.loads((checkpoint_dir / CONFIG_FILENAME).read_text())
    except (OSError, ValueError):
        return "unknown"
    return str(config.get("model_type", "unknown"))


def describe_model(checkpoint_dir: Path) -> CachedModel:
    """A `CachedModel` for one checkpoint directory (which must contain config.json)."""
    metadata = read_metadata(checkpoint_dir)
    num_params = metadata.num_params if metadata else safetensors_num_params(checkpoint_dir)
    return CachedModel(
        name=checkpoint_dir.name,
        path=checkpoint_dir,
        architecture=_architecture(checkpoint_dir),
        num_params=num_params,
        size_bytes=_dir_size_bytes(checkpoint_dir),
    )


def list_models(home: Path) -> list[CachedModel]:
    """Every cached model under `<home>/models`, sorted by name; [] if the dir is missing."""
    root = models_dir(home)
    if not root.is_dir():
        return []
    return [
        describe_model(child)
        for child in sorted(root.iterdir())
        if child.is_dir() and not child.name.startswith(".") and (child / CONFIG_FILENAME).is_file()
    ]


def resolve_model(name_or_path: str, home: Path) -> Path:
    """A checkpoint dir for name_or_path, local only (no download): an existing dir with
    config.json (also as ``file:///abs/dir``), or a cached name (also as ``store://NAME``).

    Else ``ModelNotCachedError`` with one line saying how to get it: for a path, that the
    folder is missing or is not an HF checkpoint; for a name, how to pull or create it.
    """
    text = name_or_path.strip()
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif text.startswith("store://"):
        text = text[len("store://"):].strip("/")
    as_path = Path(text).expanduser()
    if as_path.is_dir() and (as_path / CONFIG_FILENAME).is_file():
        return as_path
    if text and not text.startswith(".") and "/" not in text:
        cached = models_dir(home) / text
        if (cached / CONFIG_FILENAME).is_file():
            return cached
    if as_path.is_dir():
        raise ModelNotCachedError(
            f"{text} is not a Hugging Face checkpoint folder (no {CONFIG_FILENAME} in it)")
    if as_path.exists():
        raise ModelNotCachedError(f"{text} is a file; pass the checkpoint folder that holds it")
    if "/" in text or text.startswith((".", "~")):
        raise ModelNotCachedError(
            f"no such folder: {text} (for a Hub model use hf://org/name)")
    if text in PULLABLE:
        hint = f"run `moeflow models pull {text}`"
    else:
        hint = ("pull one with `moeflow models pull org/name` (a Hugging Face repo), pass a "
                "checkpoint folder, or `moeflow models list` to see what is cached")
    raise ModelNotCachedError(f"model {text!r} is not cached under {models_dir(home)}; {hint}")
