"""The fused C steps of a layer equal the torch ops they replace: RoPE and the cache writes bit
for bit, RMSNorm up to the order in which it sums a row's squares."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow.engine.kernels import native
from moeflow.engine.models.decoder import fused_kernels, rms_norm, rotate_half

AVX2_BUILD = ("-mno-avx512f",)


@pytest.fixture(scope="module", params=["native", "avx2"])
def kernels(request: pytest.FixtureRequest) -> native.NativeKernels:
    """The build for this CPU, and one without AVX-512 (the AVX2 paths some hosts run)."""
    if request.param == "avx2":
        return native.load(AVX2_BUILD)
    lib = native.library()
    assert lib is not None, "the test machine has a C compiler: the kernels must build"
    return lib


@pytest.mark.parametrize("rows", [1, 7])
def test_add_rms_norm_matches_torch(kernels: native.NativeKernels, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=gen)
    delta = torch.randn(rows, 576, generator=gen)
    weight = torch.rand(576, generator=gen) + 0.5
    summed, h = kernels.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(summed, x + delta)  # the residual add is exact
    torch.testing.assert_close(h, rms_norm(x + delta, weight, 1e-5), rtol=2e-6, atol=1e-6)
    same, h_alone = kernels.add_rms_norm(x, None, weight, 1e-5)
    assert same is x
    torch.testing.assert_close(h_alone, rms_norm(x, weight, 1e-5), rtol=2e-6, atol=1e-6)


def test_rope_store_is_bit_identical_to_torch(kernels: native.NativeKernels) -> None:
    tokens, heads, kv_heads, head_dim = 5, 4, 2, 16
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    cos = torch.randn(tokens, 1, head_dim, generator=gen)
    sin = torch.randn(tokens, 1, head_dim, generator=gen)
    slots = torch.tensor([7, 2, 30, 0, 15])
    k_cache = torch.zeros(32, kv_heads, head_dim)
    v_cache = torch.zeros(32, kv_heads, head_dim)
    qk = kernels.rope_store(qkv, cos.view(tokens, -1), sin.view(tokens, -1), k_cache, v_cache,
                            slots, heads, kv_heads, head_dim)
    q3 = qkv.view(tokens, -1, head_dim)
    want = (q3[:, : heads + kv_heads] * cos) + (rotate_half(q3[:, : heads + kv_heads]) * sin)
    assert torch.equal(qk, want)
    assert torch.equal(k_cache[slots], want[:, heads:])
    assert torch.equal(v_cache[slots], q3[:, heads + kv_heads :])
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


def test_a_float32_engine_runs_the_c_paths(tiny_dirs: dict[str, Path]) -> None:
    # the exactness tests pass on the torch paths too: this is what says they ran the C ones
    from tests.reference import make_engine

    engine = make_engine(tiny_dirs["llama"])
    model = engine.runner.model
    assert engine.runner._decode_kernel is not None
    assert fused_kernels(torch.float32) is not None
    assert all(layer.qkv._kp is not None for layer in model.layers)
    assert model.lm_head._kp is not None
