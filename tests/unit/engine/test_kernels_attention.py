"""The C decode-attention kernel reads contexts in place from the paged cache and agrees with
the torch path (gather + SDPA, what transformers runs) up to rounding; the library is built
once per source and CPU, and is optional."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeflow.engine.kernels import native
from moeflow.engine.models.attention import decode_gather

AVX2_BUILD = ("-mno-avx512f",)


@dataclass
class Case:
    q: torch.Tensor  # [D, H, Hd], a view of fused q|k rows as the decoder hands it over
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor
    block_size: int


def _case(heads: int, kv_heads: int, head_dim: int, block_size: int, lens: list[int]) -> Case:
    gen = torch.Generator().manual_seed(0)
    num_blocks = 64
    cache = torch.randn(2, num_blocks * block_size, kv_heads, head_dim, generator=gen)
    width = max((n + block_size - 1) // block_size for n in lens)
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)  # scattered blocks
    tables = order[: len(lens) * width].view(len(lens), width).contiguous()
    qk = torch.randn(len(lens), heads + kv_heads, head_dim, generator=gen)
    return Case(qk[:, :heads], cache[0], cache[1], tables,
                torch.tensor(lens, dtype=torch.int32), block_size)


def _sdpa(case: Case, scale: float) -> torch.Tensor:
    gather, mask = decode_gather(case.tables, case.lens, case.block_size)
    kd = case.k_cache[gather].transpose(1, 2)
    vd = case.v_cache[gather].transpose(1, 2)
    out = F.scaled_dot_product_attention(case.q.unsqueeze(2), kd, vd, attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out.squeeze(2)


def _run(kernels: native.NativeKernels, case: Case, q: torch.Tensor, scale: float
         ) -> torch.Tensor:
    return kernels.paged_decode_attention(q, case.k_cache, case.v_cache, case.tables,
                                          case.lens, case.block_size, scale)


@pytest.fixture(scope="module", params=["native", "avx2"])
def kernels(request: pytest.FixtureRequest) -> native.NativeKernels:
    """The build for this CPU, and one without AVX-512 (the AVX2 paths some hosts run)."""
    if request.param == "avx2":
        return native.load(AVX2_BUILD)
    lib = native.library()
    assert lib is not None, "the test machine has a C compiler: the kernels must build"
    return lib


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "lens"), [
    (9, 3, 64, 16, [150, 146, 1, 17, 16]),  # SmolLM2's shape, ragged lengths, block edges
    (4, 4, 16, 4, [9]),  # no GQA, one sequence
    (8, 2, 32, 8, [40, 40, 40]),  # equal lengths (the torch path then uses no mask)
    (8, 2, 128, 16, [33, 70]),  # head dim 128: groups of 4 run in passes of 2
    (10, 2, 64, 8, [1, 23, 64]),  # groups of 5 run as 4 + 1
    (6, 6, 32, 4, [17, 3]),  # no GQA on the vector path
])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_gather_and_sdpa(kernels: native.NativeKernels, heads: int,
                                        kv_heads: int, head_dim: int, block_size: int,
                                        lens: list[int], threads: int) -> None:
    case = _case(heads, kv_heads, head_dim, block_size, lens)
    scale = head_dim**-0.5
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = _run(kernels, case, case.q, scale)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, _sdpa(case, scale), rtol=1e-5, atol=1e-6)


def test_kernel_refuses_a_q_with_strided_heads(kernels: native.NativeKernels) -> None:
    case = _case(4, 2, 16, 4, [5, 6])
    q = torch.randn(2, 16, 4).transpose(1, 2)  # dims not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        _run(kernels, case, q, 0.25)


def test_build_key_follows_the_sources_and_the_cache_is_reused(tmp_path: Path) -> None:
    # a fresh cache: the first process compiles, a second one finds the file and maps it
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
            "from moeflow.engine.kernels import native; print(native.library() is not None)")
    env = {"MOEFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "PYTHONPATH": ":".join(sys.path)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=120, check=True)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120, check=True)
    assert first.stdout.strip().endswith("True") and "compiled the C kernels" in first.stdout
    assert second.stdout.strip() == "True", second.stdout  # no compile the second time
    built = list((tmp_path / "kernels").iterdir())
    assert [p.name for p in built] == [f"moeflow-kernels-{native.build_key()}.so"]


def test_switched_off_or_without_a_compiler_the_torch_path_runs(tmp_path: Path) -> None:
    code = "from moeflow.engine.kernels import native; print(native.library())"
    base = {"MOEFLOW_HOME": str(tmp_path), "HOME": str(tmp_path),
            "PYTHONPATH": ":".join(sys.path)}
    off = subprocess.run([sys.executable, "-c", code], env={**base, "PATH": "/usr/bin:/bin",
                                                            native.ENV_SWITCH: "0"},
                         capture_output=True, text=True, timeout=120, check=True)
    no_cc = subprocess.run([sys.executable, "-c", code], env={**base, "PATH": str(tmp_path),
                                                              "CC": str(tmp_path / "no-cc")},
                           capture_output=True, text=True, timeout=120, check=True)
    assert off.stdout.strip() == "None"
    assert no_cc.stdout.strip() == "None" and "C kernels unavailable" in no_cc.stderr
