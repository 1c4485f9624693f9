"""``y = x @ w.T`` with the weight packed once into oneDNN's blocked layout.

Why: decode reads every weight once per step, so a product must stream its weight once
whatever the batch size M. With the plain layouts MKL cannot (measured on a 2-core AMD EPYC,
2 threads, the 49152 x 576 LM head: ``x @ w_t`` 5.6 ms at M=1 but 21 ms at M=8 and 27 ms at
M=32; ``F.linear`` 11 ms at M=1), while oneDNN on the weight in its own blocked layout takes
4.2 / 5.2 / 10.6 ms (``benchmarks/kernels.py``).

How the packed weight lives: as plain bytes in an ordinary uint8 tensor plus oneDNN's
serialized memory descriptor (the layout, self-describing). Pickling (``torch.save`` snapshots,
XCCL ``pack``) therefore carries the packed layout as it is, ``torch.load(mmap=True)`` maps it,
and loading wraps those same bytes as a oneDNN tensor without a copy (the AOTInductor C shim
``aoti_torch_create_tensor_from_blob_v2`` does exactly that for its packed constants). So a
snapshot loads as fast as before and every instance on a node shares the pages.

The layout oneDNN picks depends on the torch build and the CPU (its ISA). ``signature()``
records both; bytes packed under another signature are still read correctly (the descriptor
says how) and are re-packed for this machine when loaded.

Who computes: the C loop of ``csrc/packed_linear.c`` over the same packed bytes when they are
float32 in a block layout it reads (blocks of 64 or 16 output rows, each ``[Kp][rows]``, written
by ``blocked_bytes`` and described to oneDNN with a descriptor patched from a probe's, checked
with one product per shape; or recognised on the values after a oneDNN reorder) and the C
kernels are built, for up to ``packed_linear_rows[block]`` rows: with AVX-512, 12 rows on
64-row blocks (oneDNN reads a weight at about half the memory's pace at small M: measured 11 vs
22 GB/s on one core), oneDNN past that; with AVX2 only, 16-row blocks at every M (the 6 x 16
tile; oneDNN is no faster at any M there, and much slower at M = 1). Where oneDNN or the shim is
missing (or for other dtypes), the weight stays dense ``[N, K]`` and the product is
``F.linear``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moeflow.engine.kernels import native

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Bump when what ``Linear`` pickles changes meaning."""


_PACKED_DTYPES = (torch.float32, torch.bfloat16)
_LINEAR_POINTWISE: Any = getattr(getattr(torch.ops.mkldnn, "_linear_pointwise", None), "default",
                                 None)


class _Shim:
    """The few AOTInductor C-shim entry points that wrap bytes as a oneDNN tensor."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        def code(name: str) -> int:
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int32
            return int(fn())

        self.mkldnn_layout = code("aoti_torch_layout__mkldnn")
        self.cpu = code("aoti_torch_device_type_cpu")
        self.dtypes = {torch.float32: code("aoti_torch_dtype_float32"),
                       torch.bfloat16: code("aoti_torch_dtype_bfloat16")}
        create = lib.aoti_torch_create_tensor_from_blob_v2
        create.restype = ctypes.c_int32
        create.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64),
            ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
            ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32, ctypes.c_char_p,
            ctypes.c_int64,
        ]
        self.create = create
        capsule = ctypes.pythonapi.PyCapsule_New
        capsule.restype = ctypes.py_object
        capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        self.capsule = capsule

    def wrap(self, data: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype,
             md: bytes) -> torch.Tensor:
        """A oneDNN tensor over ``data``'s bytes (no copy; ``data`` must outlive it)."""
        sizes = (ctypes.c_int64 * 2)(*shape)
        strides = (ctypes.c_int64 * 2)(shape[1], 1)
        handle = ctypes.c_void_p()
        err = self.create(data.data_ptr(), 2, sizes, strides, 0, self.dtypes[dtype], self.cpu,
                          0, ctypes.byref(handle), self.mkldnn_layout, md, len(md))
        if err != 0 or not handle.value:
            raise RuntimeError(f"could not wrap a packed {shape} weight (shim error {err})")
        tensor: torch.Tensor = torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(
            self.capsule(handle.value, None, None))
        return tensor


@functools.cache
def _shim() -> _Shim | None:
    if not (torch._C._has_mkldnn and _LINEAR_POINTWISE is not None
            and hasattr(torch._C, "_aoti")):
        return None
    libs = sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*"))
    try:
        return _Shim(ctypes.CDLL(str(libs[0])))
    except (IndexError, OSError, AttributeError) as exc:
        logger.warning("packed weights unavailable (%s): products use F.linear", exc)
        return None


def packing_available(dtype: torch.dtype) -> bool:
    """True when weights of ``dtype`` get packed (oneDNN and the C shim are present)."""
    return dtype in _PACKED_DTYPES and _shim() is not None


_UNPACKED: set[torch.dtype] = set()


def _warn_unpacked(dtype: torch.dtype, exc: Exception) -> None:
    if dtype not in _UNPACKED:  # once per dtype, not once per weight
        _UNPACKED.add(dtype)
        logger.warning("oneDNN cannot pack %s weights here (%s): products use F.linear",
                       dtype, exc)


def _serialized_md(packed: torch.Tensor) -> bytes:
    return bytes(torch.ops.mkldnn._get_mkldnn_serialized_md(packed).numpy().tobytes())


def blocked_rows(dense: torch.Tensor, data: torch.Tensor, block: int) -> int | None:
    """``Kp`` when ``data`` (packed bytes of float32 ``dense`` [N, K]) is laid out as blocks of
    ``block`` output rows, each ``[Kp][block]`` (what ``csrc/packed_linear.c`` reads), else None.

    Checked on the values themselves: the first and last blocks whole, plus 256 random
    elements, so another layout cannot pass unnoticed."""
    n, k = dense.shape
    blocks = (n + block - 1) // block
    if dense.dtype != torch.float32 or data.numel() % (4 * block * blocks):
        return None
    kp = data.numel() // (4 * block * blocks)
    if kp < k:
        return None
    packed = data.view(torch.float32).view(blocks, kp, block)
    for b in {0, blocks - 1}:
        rows = dense[b * block : b * block + block]
        if not torch.equal(packed[b, :k, : rows.shape[0]], rows.t()):
            return None
    gen = torch.Generator().manual_seed(n * 131 + k)
    ns = torch.randint(0, n, (256,), generator=gen)
    ks = torch.randint(0, k, (256,), generator=gen)
    if not torch.equal(packed[ns // block, ks, ns % block], dense[ns, ks]):
        return None
    return int(kp)


def packed_block(dense: torch.Tensor, data: torch.Tensor) -> tuple[int, int] | None:
    """``(block, Kp)`` of the first layout in ``native.PACKED_BLOCKS`` that ``data`` holds."""
    for block in native.PACKED_BLOCKS:
        kp = blocked_rows(dense, data, block)
        if kp is not None:
            return block, kp
    return None


def blocked_bytes(weight: torch.Tensor, block: int) -> torch.Tensor:
    """float32 ``weight`` [N, K] as the bytes of ``block``-row blocks ``[Kp][block]`` (Kp = K
    rounded up to 16, padding zeroed), the layout ``blocked_rows`` recognises."""
    n, k = weight.shape
    blocks, kp, full = (n + block - 1) // block, (k + 15) // 16 * 16, n // block
    data = torch.empty(blocks * kp * block * 4, dtype=torch.uint8)
    packed = data.view(torch.float32).view(blocks, kp, block)
    if full:
        packed[:full, :k].copy_(weight[: full * block].view(full, block, k).transpose(1, 2))
    if n > full * block:
        packed[full, :k, : n - full * block].copy_(weight[full * block :].t())
        packed[full, :, n - full * block :].zero_()
    if kp > k:
        packed[:, k:].zero_()
    return data


# oneDNN's fp32 layout on an AVX2-only CPU follows the thread count (measured with torch 2.13:
# 16-row blocks at 2, 4 and 8 threads, 64-row blocks at 1 and 3), and it reads either layout at
# any thread count equally fast (M = 256, 1 thread: 89-99 ms on 16-row blocks, 100-107 ms on
# 64-row ones). The C loop reads 16-row blocks at any M but 64-row ones only a row at a time
# without AVX-512, so the probe asks at these thread counts for the layout the loop prefers.
_PROBE_THREADS = (2, 4)


def _probe_layout(num_threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A probe weight [130, 40] and oneDNN's packing of it (at ``num_threads`` if given)."""
    n, k = 130, 40
    probe = torch.arange(n * k, dtype=torch.float32).view(n, k)
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(probe, None)
    finally:
        torch.set_num_threads(before)
    return probe, packed


def _preferred_block() -> int:
    """The block layout the C loop reads best (64 unless it only has AVX2 tiles)."""
    kernels = native.library()
    if kernels is None or kernels.packed_linear_rows[64] > 1:
        return 64
    return 16


@functools.cache
def _md_template() -> tuple[int, bytes, tuple[int, ...]] | None:
    """The block size we pack fp32 weights in here (64 or 16 rows, oneDNN's layout for a probe,
    the C loop's preferred one where oneDNN offers it), oneDNN's descriptor of a probe weight so
    packed, and where the descriptor's shape fields sit (dims, padded dims, the block stride),
    to describe any shape the same way without asking oneDNN to reorder it; None when this
    oneDNN packs otherwise."""
    preferred = _preferred_block()
    for num_threads in (None, *_PROBE_THREADS):
        probe, packed = _probe_layout(num_threads)
        nbytes = int(torch.ops.mkldnn._nbytes(packed))
        data = torch.empty(nbytes, dtype=torch.uint8)
        ctypes.memmove(data.data_ptr(), int(torch.ops.mkldnn.data_ptr(packed)), nbytes)
        found = packed_block(probe, data)
        if found is not None and found[0] == preferred:
            break
    else:
        probe, packed = _probe_layout()  # oneDNN's own choice at this thread count
        nbytes = int(torch.ops.mkldnn._nbytes(packed))
        data = torch.empty(nbytes, dtype=torch.uint8)
        ctypes.memmove(data.data_ptr(), int(torch.ops.mkldnn.data_ptr(packed)), nbytes)
        found = packed_block(probe, data)
    if found is None or found[1] != 48:
        return None
    block = found[0]
    n, k = probe.shape
    md = _serialized_md(packed)
    words = memoryview(md)[: len(md) // 8 * 8].cast("q").tolist()
    fields = []
    # dims, padded dims, stride of a block
    for value in (n, k, (n + block - 1) // block * block, 48, 48 * block):
        where = [i for i, word in enumerate(words) if word == value]
        if len(where) != 1:
            return None
        fields.append(where[0])
    return block, md, tuple(fields)


def _blocked_md(n: int, k: int) -> tuple[int, bytes] | None:
    template = _md_template()
    if template is None:
        return None
    block, md, fields = template
    kp = (k + 15) // 16 * 16
    out = bytearray(md)
    for index, value in zip(fields, (n, k, (n + block - 1) // block * block, kp, kp * block),
                            strict=True):
        out[8 * index : 8 * index + 8] = value.to_bytes(8, "little", signed=True)
    return block, bytes(out)


_AGREED: dict[tuple[int, int], bool] = {}


def _agrees_once(shape: tuple[int, int], op: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN reads a descriptor made by ``_blocked_md`` as the layout we wrote:
    checked with one product per shape and process (it is the same for every weight)."""
    if shape not in _AGREED:
        x = torch.randn(3, shape[1], generator=torch.Generator().manual_seed(0))
        y = _LINEAR_POINTWISE(x, op, None, "none", [], "")
        _AGREED[shape] = bool(torch.allclose(y, F.linear(x, weight), rtol=1e-4, atol=1e-4))
        if not _AGREED[shape]:
            logger.warning("oneDNN reads a %s weight otherwise: packing it with oneDNN", shape)
    return _AGREED[shape]


@functools.cache
def signature() -> str:
    """What decides the packed layout here: this format, torch (and its oneDNN), the CPU's ISA
    as ATen sees it, and the layout we pack a probe weight in (``_md_template``'s, else
    oneDNN's at this thread count)."""
    digest = hashlib.sha256(
        f"{FORMAT_VERSION}|{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}".encode()
    )
    template = _md_template()
    digest.update(template[1] if template is not None else _serialized_md(_probe_layout()[1]))
    return digest.hexdigest()[:16]


class Linear:
    """A weight ``[N, K]`` and its product ``x [M, K] -> x @ weight.T [M, N]``.

    Picklable; unpickling packed bytes wraps them without a copy. ``pack=False`` keeps the
    weight dense (``F.linear``), the reference the benchmarks compare against.
    """

    def __init__(self, weight: torch.Tensor, *, pack: bool = True) -> None:
        if weight.dim() != 2:
            raise ValueError(f"a Linear weight is [N, K], got {tuple(weight.shape)}")
        self.shape: tuple[int, int] = (int(weight.shape[0]), int(weight.shape[1]))
        self.dtype = weight.dtype
        self._md: bytes | None = None
        self._signature: str | None = None
        self._kp: int | None = None  # k rows per block when the C loop can read the bytes
        self._block = 64  # output rows per block of that layout
        self._op: torch.Tensor = weight.contiguous()
        self._data: torch.Tensor = self._op
        if pack and packing_available(weight.dtype):
            try:
                self._pack(self._op)
            except RuntimeError as exc:  # e.g. bf16 on a CPU without AVX-512 BF16 support
                _warn_unpacked(weight.dtype, exc)
                self._md = self._signature = self._kp = None
                self._op = self._data = weight.contiguous()

    def _pack(self, weight: torch.Tensor) -> None:
        shim = _shim()
        assert shim is not None
        weight = weight.contiguous()
        self._signature = signature()
        blocked = _blocked_md(*self.shape) if self.dtype == torch.float32 else None
        if blocked is not None:
            # the layout oneDNN picks here, written straight into our own buffer: one copy
            block, md = blocked
            data = blocked_bytes(weight, block)
            op = shim.wrap(data, self.shape, self.dtype, md)
            if _agrees_once(self.shape, op, weight):
                self._md, self._data, self._op = md, data, op
                self._kp, self._block = (self.shape[1] + 15) // 16 * 16, block
                return
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        nbytes = int(torch.ops.mkldnn._nbytes(packed))
        # own the bytes in an ordinary tensor (what pickling carries), and compute on a
        # oneDNN view of them, exactly as after unpickling
        data = torch.empty(nbytes, dtype=torch.uint8)
        ctypes.memmove(data.data_ptr(), int(torch.ops.mkldnn.data_ptr(packed)), nbytes)
        self._md = _serialized_md(packed)
        self._data = data
        self._op = shim.wrap(data, self.shape, self.dtype, self._md)
        found = packed_block(weight, data)
        self._block, self._kp = found if found is not None else (64, None)

    @property
    def is_packed(self) -> bool:
        return self._md is not None

    @property
    def nbytes(self) -> int:
        """Bytes one product reads (the packed layout may pad the weight)."""
        return self._data.numel() * self._data.element_size()

    @property
    def storage(self) -> torch.Tensor:
        """The tensor that holds the weight's bytes (dense, or packed as uint8)."""
        return self._data

    def dense(self) -> torch.Tensor:
        """The weight as ``[N, K]`` (a copy when packed)."""
        return self._op.to_dense() if self._md is not None else self._op

    def c_loop_rows(self, kernels: native.NativeKernels) -> int:
        """Up to how many rows ``__call__`` runs this product in the C loop of ``kernels``
        (float32 rows, contiguous); 0 when never."""
        if self._md is None or self._kp is None or self.dtype != torch.float32:
            return 0
        return kernels.packed_linear_rows[self._block]

    def c_loop_packing(self) -> tuple[int, int]:
        """``(Kp, block rows)`` of the bytes the C loop reads (only when ``c_loop_rows``)."""
        assert self._kp is not None
        return self._kp, self._block

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._md is None:
            return F.linear(x, self._op)
        if x.shape[0] == 0:
            return x.new_empty((0, self.shape[0]))
        if self._kp is not None and x.stride(1) == 1 and x.dtype == torch.float32:
            # few rows: the C loop over the same bytes (up to where oneDNN overtakes it)
            kernels = native.library()
            if kernels is not None and x.shape[0] <= kernels.packed_linear_rows[self._block]:
                return kernels.packed_linear(x, self._data, self.shape[0], self.shape[1],
                                             self._kp, self._block)
        y: torch.Tensor = _LINEAR_POINTWISE(x, self._op, None, "none", [], "")
        return y

    def __repr__(self) -> str:
        kind = "packed" if self._md is not None else "dense"
        return f"Linear({self.shape[0]}x{self.shape[1]}, {self.dtype}, {kind})"

    def __getstate__(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "shape": self.shape, "dtype": self.dtype,
                "data": self._data, "md": self._md, "signature": self._signature,
                "kp": self._kp, "block": self._block}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"Linear of format {state.get('format')}, expected {FORMAT_VERSION}")
        self.shape = tuple(state["shape"])  # type: ignore[assignment]
        self.dtype = state["dtype"]
        self._data = state["data"]
        self._md = state["md"]
        self._signature = state["signature"]
        self._kp = state["kp"]
        self._block = state.get("block", 64)  # pickled before 16-row blocks were read
        if self._md is None:
            self._op = self._data
            return
        shim = _shim()
        if shim is None:
            raise RuntimeError("this weight was packed by oneDNN, which this torch lacks")
        self._op = shim.wrap(self._data, self.shape, self.dtype, self._md)
        if self._signature != signature():  # packed elsewhere: right values, other layout
            self._pack(self._op.to_dense())
