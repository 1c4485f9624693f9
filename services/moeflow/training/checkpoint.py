"""Checkpoints of a training run: `<output>/checkpoints/step-<N>/`, each complete or absent.

A checkpoint holds what the next step depends on: the adapter weights
(`adapter_model.safetensors`), the optimizer's and scheduler's state and the RNG state
(`training_state.pt`), and `trainer_state.json` (step, loss history, the run's fingerprint).
It is written into a hidden temporary directory, each file fsynced, and then renamed into
place, so a process killed at any instant (SIGKILL, OOM, a node going away) leaves either the
previous checkpoint or the new one, never half of one. `latest` ignores anything else.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
ADAPTER_FILE = "adapter_model.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
STATE_FILE = "trainer_state.json"
_PREFIX = "step-"


@dataclass(frozen=True)
class TrainerState:
    step: int
    """Optimizer steps done."""
    total_steps: int
    losses: list[float]
    """Loss of every step so far (step 1 first)."""
    trained_tokens: int
    fingerprint: str
    """Hash of everything that decides the result (see `loop.fingerprint`)."""


@dataclass
class Checkpoint:
    path: Path
    state: TrainerState
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"{_PREFIX}{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(output: Path, state: TrainerState, *, adapter: Mapping[str, torch.Tensor],
         optimizer: Mapping[str, Any], scheduler: Mapping[str, Any], rng: Mapping[str, Any],
         keep: int = 2) -> Path:
    """Write the checkpoint of `state.step` atomically; keep the newest `keep`."""
    final = checkpoint_dir(output, state.step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()},
              tmp / ADAPTER_FILE)
    torch.save({"optimizer": dict(optimizer), "scheduler": dict(scheduler), "rng": dict(rng)},
               tmp / TRAINING_STATE_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
    for name in (ADAPTER_FILE, TRAINING_STATE_FILE, STATE_FILE):
        _fsync(tmp / name)
    if final.exists():  # a rerun that got this far before: same step, same content
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    for old in complete(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(output: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and all((p / f).is_file() for f in (ADAPTER_FILE, TRAINING_STATE_FILE, STATE_FILE))]
    return sorted(found, key=lambda p: p.name)


def latest(output: Path) -> Path | None:
    found = complete(output)
    return found[-1] if found else None


def load(path: Path, device: torch.device) -> Checkpoint:
    state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    rest = torch.load(path / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    adapter = load_file(path / ADAPTER_FILE, device=str(device))
    return Checkpoint(path, state, adapter, rest["optimizer"], rest["scheduler"], rest["rng"])


def remove_all(output: Path) -> None:
    shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
