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

Who computes: up to ``packed_linear_rows`` rows (decode; 12 with AVX-512, 8 with AVX2), the C
loop of ``csrc/packed_linear.c`` over the same packed bytes when they are float32 in the 64-row
block layout oneDNN uses for fp32 here (written by ``blocked64_bytes`` and described to oneDNN
with a descriptor patched from a probe's, checked with one product per shape; or recognised on
the values after a oneDNN reorder) and the C kernels are built: oneDNN reads a weight at about
half the memory's pace at M = 1 (measured 11 vs 22 GB/s on one core). Larger products (batches
of 32, prefill) run oneDNN. Where oneDNN or the shim is missing (or for other dtypes), the
weight stays dense ``[N, K]`` and the product is ``F.linear``.
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


def blocked64_rows(dense: torch.Tensor, data: torch.Tensor) -> int | None:
    """``Kp`` when ``data`` (packed bytes of float32 ``dense`` [N, K]) is laid out as blocks of
    64 output rows, each ``[Kp][64]`` (what ``csrc/packed_linear.c`` reads), else None.

    Checked on the values themselves: the first and last blocks whole, plus 256 random
    elements, so another layout cannot pass unnoticed."""
    n, k = dense.shape
    blocks = (n + 63) // 64
    if dense.dtype != torch.float32 or data.numel() % (4 * 64 * blocks):
        return None
    kp = data.numel() // (4 * 64 * blocks)
    if kp < k:
        return None
    packed = data.view(torch.float32).view(blocks, kp, 64)
    for b in {0, blocks - 1}:
        rows = dense[b * 64 : b * 64 + 64]
        if not torch.equal(packed[b, :k, : rows.shape[0]], rows.t()):
            return None
    gen = torch.Generator().manual_seed(n * 131 + k)
    ns = torch.randint(0, n, (256,), generator=gen)
    ks = torch.randint(0, k, (256,), generator=gen)
    if not torch.equal(packed[ns // 64, ks, ns % 64], dense[ns, ks]):
        return None
    return int(kp)


def blocked64_bytes(weight: torch.Tensor) -> torch.Tensor:
    """float32 ``weight`` [N, K] as the bytes of 64-row blocks ``[Kp][64]`` (Kp = K rounded up
    to 16, padding zeroed), the layout ``blocked64_rows`` recognises."""
    n, k = weight.shape
    blocks, kp, full = (n + 63) // 64, (k + 15) // 16 * 16, n // 64
    data = torch.empty(blocks * kp * 64 * 4, dtype=torch.uint8)
    packed = data.view(torch.float32).view(blocks, kp, 64)
    if full:
        packed[:full, :k].copy_(weight[: full * 64].view(full, 64, k).transpose(1, 2))
    if n > full * 64:
        packed[full, :k, : n - full * 64].copy_(weight[full * 64 :].t())
        packed[full, :, n - full * 64 :].zero_()
    if kp > k:
        packed[:, k:].zero_()
    return data


@functools.cache
def _md_template() -> tuple[bytes, tuple[int, ...]] | None:
    """oneDNN's descriptor of a probe weight packed in 64-row blocks, and where its shape
    fields sit (dims, padded dims, the block stride), to describe any shape the same way
    without asking oneDNN to reorder it; None when this oneDNN packs otherwise."""
    n, k = 130, 40
    probe = torch.arange(n * k, dtype=torch.float32).view(n, k)
    packed = torch.ops.mkldnn._reorder_linear_weight(probe, None)
    nbytes = int(torch.ops.mkldnn._nbytes(packed))
    data = torch.empty(nbytes, dtype=torch.uint8)
    ctypes.memmove(data.data_ptr(), int(torch.ops.mkldnn.data_ptr(packed)), nbytes)
    if blocked64_rows(probe, data) != 48:
        return None
    md = _serialized_md(packed)
    words = memoryview(md)[: len(md) // 8 * 8].cast("q").tolist()
    fields = []
    for value in (n, k, 192, 48, 48 * 64):  # dims, padded dims, stride of a 64-row block
        where = [i for i, word in enumerate(words) if word == value]
        if len(where) != 1:
            return None
        fields.append(where[0])
    return md, tuple(fields)


def _blocked64_md(n: int, k: int) -> bytes | None:
    template = _md_template()
    if template is None:
        return None
    md, fields = template
    kp = (k + 15) // 16 * 16
    out = bytearray(md)
    for index, value in zip(fields, (n, k, (n + 63) // 64 * 64, kp, kp * 64), strict=True):
        out[8 * index : 8 * index + 8] = value.to_bytes(8, "little", signed=True)
    return bytes(out)


_AGREED: dict[tuple[int, int], bool] = {}


def _agrees_once(shape: tuple[int, int], op: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN reads a descriptor made by ``_blocked64_md`` as the layout we wrote:
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
    as ATen sees it, and the layout oneDNN picks for a probe weight."""
    probe = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(80, 48), None)
    digest = hashlib.sha256(
        f"{FORMAT_VERSION}|{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}".encode()
    )
    digest.update(_serialized_md(probe))
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
        self._kp: int | None = None  # rows per 64-row block when the C loop can read the bytes
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
        md = _blocked64_md(*self.shape) if self.dtype == torch.float32 else None
        if md is not None:
            # the layout oneDNN picks here, written straight into our own buffer: one copy
            data = blocked64_bytes(weight)
            op = shim.wrap(data, self.shape, self.dtype, md)
            if _agrees_once(self.shape, op, weight):
                self._md, self._data, self._op = md, data, op
                self._kp = (self.shape[1] + 15) // 16 * 16
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
        self._kp = blocked64_rows(weight, data)

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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._md is None:
            return F.linear(x, self._op)
        if x.shape[0] == 0:
            return x.new_empty((0, self.shape[0]))
        if self._kp is not None and x.stride(1) == 1 and x.dtype == torch.float32:
            # few rows: the C loop over the same bytes (up to where oneDNN overtakes it)
            kernels = native.library()
            if kernels is not None and x.shape[0] <= kernels.packed_linear_rows:
                return kernels.packed_linear(x, self._data, self.shape[0], self.shape[1],
                                             self._kp)
        y: torch.Tensor = _LINEAR_POINTWISE(x, self._op, None, "none", [], "")
        return y

    def __repr__(self) -> str:
        kind = "packed" if self._md is not None else "dense"
        return f"Linear({self.shape[0]}x{self.shape[1]}, {self.dtype}, {kind})"

    def __getstate__(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "shape": self.shape, "dtype": self.dtype,
                "data": self._data, "md": self._md, "signature": self._signature,
                "kp": self._kp}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"Linear of format {state.get('format')}, expected {FORMAT_VERSION}")
        self.shape = tuple(state["shape"])  # type: ignore[assignment]
        self.dtype = state["dtype"]
        self._data = state["data"]
        self._md = state["md"]
        self._signature = state["signature"]
        self._kp = state["kp"]
        if self._md is None:
            self._op = self._data
            return
        shim = _shim()
        if shim is None:
            raise RuntimeError("this weight was packed by oneDNN, which this torch lacks")
        self._op = shim.wrap(self._data, self.shape, self.dtype, self._md)
        if self._signature != signature():  # packed elsewhere: right values, other layout
            self._pack(self._op.to_dense())
