"""Shared pytest fixtures. Heavy imports (torch, transformers) stay inside the fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# --- checkpoints (moeflow.checkpoints) -------------------------------------------------------


@pytest.fixture(scope="session")
def moeflow_home() -> Path:
    """The model cache root: $MOEFLOW_HOME, else ~/.cache/moeflow (shared across runs)."""
    from moeflow.checkpoints.store import resolve_home

    return resolve_home(os.environ)


@pytest.fixture(scope="session")
def smollm2_dir(moeflow_home: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF checkpoint, pulled and converted once per cache."""
    import torch

    from moeflow.checkpoints.pull import pull

    torch.set_num_threads(1)
    return pull("smollm2-135m-instruct", moeflow_home, progress=None)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> tiny random checkpoint dir (seed 0), for every arch in `TINY_ARCHS`."""
    import torch

    from moeflow.checkpoints.tiny import TINY_ARCHS, make_tiny, tiny_dir_name

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny(arch, root / tiny_dir_name(arch), seed=0) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def upcycled_smollm2_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 upcycled to 4 experts, top-2, random router (~1.5 GB, once per session)."""
    from moeflow.checkpoints.upcycle import UpcycleSpec, upcycle

    root = tmp_path_factory.mktemp("upcycled")
    return upcycle(smollm2_dir, root / "smollm2-moe4x2", UpcycleSpec(num_experts=4, top_k=2))
