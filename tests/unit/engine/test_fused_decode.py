"""A decode step's layers in one C call (``models/fused_decode.py``) give the very bits of the
per-layer path: hidden states and the K/V written into the cache, step after step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.models import fused_decode
from moeflow.engine.models.attention import AttentionMetadata
from moeflow.engine.models.decoder import DecoderModel
from tests.reference import make_engine, run_engine


def _check_every_decode_step(engine: LLMEngine) -> list[int]:
    """Make ``forward`` run each step both ways (on a copy of the cache for the fused one) and
    assert they agree; returns the batch sizes of the steps that ran fused."""
    model: DecoderModel = engine.runner.model
    fused = model.fused_decode()
    assert fused is not None
    per_layer = DecoderModel.forward
    fused_batches: list[int] = []

    def both(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
             kv_cache: torch.Tensor) -> torch.Tensor:
        applies = fused.applies(int(input_ids.shape[0]), meta, kv_cache)
        cache_copy = kv_cache.clone()
        cos, sin = model.rope(positions)
        got = fused(input_ids, cos, sin, meta, cache_copy, model.scale) if applies else None
        model._fused = None  # the per-layer path
        try:
            want = per_layer(model, input_ids, positions, meta, kv_cache)
        finally:
            model._fused = fused
        if got is not None:
            fused_batches.append(int(input_ids.shape[0]))
            assert torch.equal(got, want)
            assert torch.equal(cache_copy, kv_cache)
        return want

    model.forward = both  # type: ignore[method-assign]
    return fused_batches


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_decode_is_bit_identical_to_the_layer_path(
        tiny_dirs: dict[str, Path], threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        engine = make_engine(tiny_dirs["llama"], num_threads=threads, max_num_seqs=8)
        batches = _check_every_decode_step(engine)
        gen = torch.Generator().manual_seed(threads)
        prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (5, 17, 40, 3)]
        outputs, _ = run_engine(engine, prompts, max_tokens=12)
    finally:
        torch.set_num_threads(1)
    assert all(len(out) == 12 for out in outputs)
    # decode steps of 4, then of fewer as sequences finish, all of them fused
    assert 4 in batches and len(batches) >= 11


def test_smollm2_decode_fused_equals_the_layer_path(smollm2_dir: Path) -> None:
    engine = make_engine(smollm2_dir, max_num_seqs=4, kv_cache_bytes=64 * 2**20)
    batches = _check_every_decode_step(engine)
    outputs, _ = run_engine(engine, [[1, 2, 3, 4, 5], list(range(100, 160))], max_tokens=6)
    assert [len(out) for out in outputs] == [6, 6]
    assert 2 in batches


def test_the_plan_is_built_only_for_dense_layers_without_bias(
        tiny_dirs: dict[str, Path]) -> None:
    assert make_engine(tiny_dirs["llama"]).runner.model.fused_decode() is not None
    for arch in ("qwen3_moe", "mixtral", "qwen2_moe"):  # routed experts, Q/K norms
        assert make_engine(tiny_dirs[arch]).runner.model.fused_decode() is None, arch


def test_the_switch_keeps_the_layer_path(tiny_dirs: dict[str, Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fused_decode.ENV_SWITCH, "0")
    assert make_engine(tiny_dirs["llama"]).runner.model.fused_decode() is None


def test_a_pickled_model_drops_the_plan_and_rebuilds_it(tiny_dirs: dict[str, Path],
                                                        tmp_path: Path) -> None:
    model = make_engine(tiny_dirs["llama"]).runner.model
    assert model.fused_decode() is not None
    torch.save(model, tmp_path / "model.pt")
    loaded: Any = torch.load(tmp_path / "model.pt", weights_only=False)
    assert "_fused" not in loaded.__dict__
    assert loaded.fused_decode() is not None
