"""torch <-> payload bytes: the only `moeflow.xccl` module that does tensor arithmetic.

Conversions never go through Python bytes objects: a tensor is reinterpreted as a flat uint8 view
(`as_bytes`), copied once into the payload buffer (`write_payload`), and a received payload is
turned back into tensors as *views* of the buffer (`views_of_payload`), so no copy happens on the
receive side. The caller owns the buffer lifetimes; views keep their buffer alive by reference.
Non-CPU tensors are accepted on the send side (`copy_` moves them to the host buffer); received
tensors are always on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from moeflow.xccl.messages import TensorMeta, plan_layout

TORCH_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def layout_of(tensors: Sequence[torch.Tensor]) -> tuple[tuple[TensorMeta, ...], int]:
    """Payload layout for `tensors`; raises TypeError for non-tensors or unsupported dtypes."""
    specs = []
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _NAMES:
            raise TypeError(f"unsupported dtype {t.dtype}; supported: {sorted(TORCH_DTYPES)}")
        specs.append((_NAMES[t.dtype], tuple(t.shape)))
    return plan_layout(specs)


def layout_of_specs(
    specs: Sequence[tuple[torch.dtype, Sequence[int]]],
) -> tuple[tuple[TensorMeta, ...], int]:
    """Payload layout for tensors given as (dtype, shape), as `layout_of` places them."""
    named = []
    for dtype, shape in specs:
        if dtype not in _NAMES:
            raise TypeError(f"unsupported dtype {dtype}; supported: {sorted(TORCH_DTYPES)}")
        named.append((_NAMES[dtype], tuple(shape)))
    return plan_layout(named)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of `t` (a contiguous copy first only when `t` is not contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def write_payload(
    dst: torch.Tensor, metas: Sequence[TensorMeta], tensors: Sequence[torch.Tensor]
) -> None:
    """Copy each tensor's bytes into `dst` (a flat uint8 CPU tensor) at its planned offset."""
    for meta, t in zip(metas, tensors, strict=True):
        if meta.num_bytes:
            dst[meta.offset : meta.offset + meta.num_bytes].copy_(as_bytes(t))


def views_of_payload(payload: torch.Tensor, metas: Sequence[TensorMeta]) -> list[torch.Tensor]:
    """Tensors viewing `payload` (flat uint8) in place, each with its dtype and shape."""
    out = []
    for meta in metas:
        dtype = TORCH_DTYPES[meta.dtype]
        if meta.num_bytes == 0:
            out.append(torch.empty(meta.shape, dtype=dtype))
            continue
        flat = payload[meta.offset : meta.offset + meta.num_bytes].view(dtype)
        out.append(flat.view(meta.shape))
    return out


def payload_from_numpy(array: npt.NDArray[np.uint8]) -> torch.Tensor:
    """Wrap a writable flat uint8 numpy array without copying (the tensor keeps it alive)."""
    return torch.from_numpy(array)
