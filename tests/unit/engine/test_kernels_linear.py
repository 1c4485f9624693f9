"""``kernels.Linear``: packed products equal the dense ones, and the packed bytes survive
pickling, ``torch.save``/``torch.load(mmap=True)`` and another machine's layout."""

from __future__ import annotations

import ctypes
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeflow.engine.kernels import Linear, native, packing_available
from moeflow.engine.kernels import linear as linear_module
from moeflow.engine.kernels.linear import blocked_bytes, blocked_rows


def test_the_pinned_torch_packs() -> None:
    # the x86 CPU wheel the project pins has oneDNN and the AOTI shim; without them every
    # product silently falls back to F.linear, which this test makes loud
    assert packing_available(torch.float32) and packing_available(torch.bfloat16)
    assert not packing_available(torch.float16)


def _weight(n: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(n * 1000 + k)) * 0.1).to(
        dtype)


@pytest.mark.parametrize("shape", [(96, 64), (100, 37), (3, 200)])
@pytest.mark.parametrize("m", [0, 1, 8, 33])
def test_packed_product_equals_dense(shape: tuple[int, int], m: int) -> None:
    w = _weight(*shape)
    layer = Linear(w)
    assert layer.is_packed and layer.shape == shape
    x = torch.randn(m, shape[1])
    y = layer(x)
    assert y.shape == (m, shape[0]) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.dense(), w)  # the packing itself is exact


def test_bfloat16_is_packed_and_close_where_onednn_can_else_plain() -> None:
    """oneDNN packs bf16 only on CPUs with AVX-512 BF16; elsewhere the layer falls back to
    the plain weight and computes exactly F.linear."""
    w = _weight(64, 48, torch.bfloat16)
    layer = Linear(w)
    x = torch.randn(5, 48).to(torch.bfloat16)
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        has_bf16 = "avx512_bf16" in f.read().split()
    if has_bf16:
        assert layer.is_packed
    if layer.is_packed:
        torch.testing.assert_close(layer(x).float(), F.linear(x, w).float(), rtol=2e-2,
                                   atol=2e-2)
    else:
        assert torch.equal(layer(x), F.linear(x, w))


def test_unpacked_weight_is_plain_f_linear() -> None:
    w = _weight(40, 24)
    layer = Linear(w, pack=False)
    x = torch.randn(3, 24)
    assert not layer.is_packed and layer.storage is layer.dense()
    assert torch.equal(layer(x), F.linear(x, w))
    assert torch.equal(pickle.loads(pickle.dumps(layer))(x), F.linear(x, w))


def test_pickle_round_trip_gives_the_same_bits() -> None:
    layer = Linear(_weight(100, 37))
    x = torch.randn(7, 37)
    again = pickle.loads(pickle.dumps(layer))
    assert again.is_packed and again.shape == layer.shape
    assert torch.equal(again(x), layer(x))


def test_mmap_load_computes_on_the_mapped_bytes(tmp_path: Path) -> None:
    layer = Linear(_weight(96, 64))
    torch.save({"w": layer}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", mmap=True, weights_only=False)["w"]
    x = torch.randn(4, 64)
    assert torch.equal(loaded(x), layer(x))
    # no copy: oneDNN reads the very bytes torch.load mapped
    assert torch.ops.mkldnn.data_ptr(loaded._op) == loaded.storage.data_ptr()


def test_bytes_packed_under_another_signature_are_repacked() -> None:
    layer = Linear(_weight(96, 64))
    state = layer.__getstate__()
    state["signature"] = "another-machine"
    moved = Linear.__new__(Linear)
    moved.__setstate__(state)
    assert moved._signature == linear_module.signature()
    assert moved.storage.data_ptr() != layer.storage.data_ptr()
    x = torch.randn(3, 64)
    assert torch.equal(moved(x), layer(x))


def test_a_state_of_another_format_is_refused() -> None:
    state = Linear(_weight(8, 8)).__getstate__()
    state["format"] = -1
    with pytest.raises(ValueError, match="format"):
        Linear.__new__(Linear).__setstate__(state)


@pytest.mark.parametrize("block", native.PACKED_BLOCKS)
def test_decode_rows_run_the_c_loop_on_the_packed_bytes(block: int) -> None:
    kernels = native.library()
    assert kernels is not None and kernels.packed_linear_rows[block] >= 1, "this machine builds it"
    rows = min(kernels.packed_linear_rows[block], 200)  # 200: more than one pass of rows
    w = _weight(100, 37)  # a partial block, K not a multiple of 16
    data = blocked_bytes(w, block)
    assert blocked_rows(w, data, block) == 48
    x = torch.randn(rows, 37)
    y = kernels.packed_linear(x, data, 100, 37, 48, block)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    # a row's result does not depend on the rows computed beside it (or on the tile it fell in)
    for m in sorted({m for m in (1, 3, 5, 7, 13, 97, rows) if m <= rows}):
        assert torch.equal(kernels.packed_linear(x[:m], data, 100, 37, 48, block), y[:m])
        assert torch.equal(kernels.packed_linear(x[-m:], data, 100, 37, 48, block), y[-m:])


def test_linear_packs_the_layout_the_c_loop_reads_best() -> None:
    # oneDNN's fp32 layout is 64-row blocks on AVX-512 CPUs; on AVX2-only ones it follows the
    # thread count (16 or 64 rows), and Linear asks for the 16-row one the AVX2 loop reads at
    # any batch size: at every thread count, the bytes are a layout the C loop reads
    kernels = native.library()
    assert kernels is not None
    preferred = 64 if kernels.packed_linear_rows[64] > 1 else 16
    w = _weight(100, 37)
    before = torch.get_num_threads()
    try:
        for num_threads in (1, 2, 3):
            torch.set_num_threads(num_threads)
            linear_module._md_template.cache_clear()
            layer = Linear(w)
            assert (layer._block, layer._kp) == (preferred, 48), num_threads
            assert blocked_rows(w, layer.storage, preferred) == 48
            rows = min(kernels.packed_linear_rows[preferred], 300)
            x = torch.randn(rows + 2, 37)  # the C loop, then oneDNN past its rows (if any)
            for m in (1, rows, rows + 2):
                torch.testing.assert_close(layer(x[:m]), F.linear(x[:m], w), rtol=1e-5,
                                           atol=1e-5)
            assert torch.equal(layer(x[:1]), kernels.packed_linear(x[:1], layer.storage, 100, 37,
                                                                     48, preferred))
            # non-contiguous rows (a view with a leading stride) read correctly
            wide = torch.randn(4, 50)
            assert torch.equal(layer(wide[:, :37]), layer(wide[:, :37].contiguous()))
    finally:
        torch.set_num_threads(before)
        linear_module._md_template.cache_clear()


@pytest.mark.parametrize("block", native.PACKED_BLOCKS)
def test_the_layout_check_rejects_other_layouts(block: int) -> None:
    w = _weight(130, 40)
    data = blocked_bytes(w, block)
    assert blocked_rows(w, data, block) == 48
    other = 16 if block == 64 else 64
    assert blocked_rows(w, data, other) is None
    shuffled = data.view(torch.float32).flip(0).contiguous().view(torch.uint8)
    assert blocked_rows(w, shuffled, block) is None
    bf16 = Linear(w.to(torch.bfloat16)).storage
    assert blocked_rows(w.to(torch.bfloat16), bf16, block) is None


@pytest.mark.parametrize("build", [(), ("-mno-avx512f",)], ids=["native", "avx2"])
@pytest.mark.parametrize("block", native.PACKED_BLOCKS)
def test_c_loop_builds_read_the_packed_layout(build: tuple[str, ...], block: int) -> None:
    kernels = native.load(build)
    has_avx512 = "avx512f" in native._cpu_flags().split() and not build
    # the rows each build takes on (past them, oneDNN): 16-row blocks in 6 x 16 tiles at any
    # batch; 64-row blocks in AVX-512 tiles, or one row at a time with AVX2 only
    expected = {16: 1 << 30, 64: 12 if has_avx512 else 1}[block]
    assert kernels.packed_linear_rows[block] == expected
    w = _weight(150, 37)  # whole blocks and a partial one
    data = blocked_bytes(w, block)
    for m in [m for m in (1, 2, 3, 5, 12, 40, 250) if m <= expected]:
        x = torch.randn(m, 37)
        y = kernels.packed_linear(x, data, 150, 37, 48, block)
        torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(100, 37), (128, 64), (3, 200), (130, 40)])
def test_direct_packing_writes_a_layout_onednn_reads(shape: tuple[int, int]) -> None:
    # Linear writes the blocked layout itself (one copy) and patches the descriptor: oneDNN
    # must read those bytes as that layout, past the rows the C loop takes too
    w = _weight(*shape)
    layer = Linear(w)
    assert layer.is_packed and torch.equal(layer.storage, blocked_bytes(w, layer._block))
    x = torch.randn(300, shape[1])
    torch.testing.assert_close(layer(x), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_the_patched_descriptor_is_onednns_own_for_the_probe() -> None:
    # oneDNN's choice of layout follows the shape and the thread count; at a thread count
    # where it packs the probe shape in the template's layout, its bytes and descriptor are
    # exactly what Linear writes
    w = _weight(130, 40)
    layer = Linear(w)
    before = torch.get_num_threads()
    found = False
    try:
        for num_threads in (before, 1, 2, 4):
            torch.set_num_threads(num_threads)
            reference = torch.ops.mkldnn._reorder_linear_weight(w, None)
            if linear_module._serialized_md(reference) == layer._md:
                found = True
                break
    finally:
        torch.set_num_threads(before)
    assert found
    nbytes = int(torch.ops.mkldnn._nbytes(reference))
    theirs = torch.empty(nbytes, dtype=torch.uint8)
    ctypes.memmove(theirs.data_ptr(), int(torch.ops.mkldnn.data_ptr(reference)), nbytes)
    assert torch.equal(layer.storage, theirs)
