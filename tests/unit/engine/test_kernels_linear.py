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
from moeflow.engine.kernels.linear import blocked64_bytes, blocked64_rows


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


def test_few_rows_run_the_c_loop_on_the_packed_bytes() -> None:
    kernels = native.library()
    assert kernels is not None and kernels.packed_linear_rows >= 8, "this machine builds it"
    rows = kernels.packed_linear_rows
    w = _weight(100, 37)  # a partial 64-row block, K not a multiple of 16
    data = blocked64_bytes(w)
    assert blocked64_rows(w, data) == 48
    x = torch.randn(rows, 37)
    y = kernels.packed_linear(x, data, 100, 37, 48)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    # a row's result does not depend on the rows computed beside it
    for m in (1, 3, 5, rows):
        assert torch.equal(kernels.packed_linear(x[:m], data, 100, 37, 48), y[:m])
    # Linear runs the C loop exactly when the bytes it packed are in that layout: oneDNN's
    # fp32 layout on AVX-512 CPUs; on AVX2-only CPUs oneDNN blocks by fewer rows and computes
    # every product itself
    layer = Linear(w)
    assert layer._kp == blocked64_rows(w, layer.storage)
    if layer._kp is not None:
        assert torch.equal(layer(x), y)
    torch.testing.assert_close(layer(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    # non-contiguous rows (a view with a leading stride) read correctly
    wide = torch.randn(4, 50)
    assert torch.equal(layer(wide[:, :37]), layer(wide[:, :37].contiguous()))


def test_the_layout_check_rejects_other_layouts() -> None:
    w = _weight(130, 40)
    data = blocked64_bytes(w)
    assert blocked64_rows(w, data) == 48
    shuffled = data.view(torch.float32).flip(0).contiguous().view(torch.uint8)
    assert blocked64_rows(w, shuffled) is None
    assert blocked64_rows(w.to(torch.bfloat16), Linear(w.to(torch.bfloat16)).storage) is None


@pytest.mark.parametrize("build", [(), ("-mno-avx512f",)], ids=["native", "avx2"])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 12])
def test_c_loop_builds_read_the_packed_layout(build: tuple[str, ...], m: int) -> None:
    kernels = native.load(build)
    assert kernels.packed_linear_rows > 0
    w = _weight(150, 37)  # blocks of 64 rows: two whole and a partial one
    data = blocked64_bytes(w)
    x = torch.randn(m, 37)
    y = kernels.packed_linear(x, data, 150, 37, 48)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(100, 37), (128, 64), (3, 200)])
def test_direct_packing_writes_the_bytes_onednn_would(shape: tuple[int, int]) -> None:
    # Linear writes the blocked layout itself (one copy) and patches the descriptor: both must
    # be exactly what oneDNN's own reorder produces
    w = _weight(*shape)
    layer = Linear(w)
    reference = torch.ops.mkldnn._reorder_linear_weight(w, None)
    nbytes = int(torch.ops.mkldnn._nbytes(reference))
    theirs = torch.empty(nbytes, dtype=torch.uint8)
    ctypes.memmove(theirs.data_ptr(), int(torch.ops.mkldnn.data_ptr(reference)), nbytes)
    assert torch.equal(layer.storage, theirs)
    assert layer._md == linear_module._serialized_md(reference)
