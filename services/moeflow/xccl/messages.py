"""Wire format of one XCCL message: a self-describing frame header. Pure: no torch, no I/O.

A *message* is the ordered list of tensors one `send` carries under one (sender, tag). Every
backend moves it as a *frame header* plus one contiguous *payload* in which tensor i occupies the
bytes ``[tensors[i].offset, tensors[i].offset + tensors[i].num_bytes)``. Offsets are multiples of
`PAYLOAD_ALIGN_BYTES`, so a receiver can view every tensor in place whatever its dtype.

Header layout (little endian), version `WIRE_VERSION`:

    fixed   magic b"XCCL", version u8, flags u8, num_tensors u16, sender_len u16, tag_len u16,
            location_len u16, payload_offset u64, payload_num_bytes u64, chunk_num_bytes u64,
            checksum u32
    names   sender, tag, location (utf-8)
    tensors per tensor: dtype code u8, ndim u8, offset u64, num_bytes u64, shape i64[ndim]

`location` and `payload_offset` say where the payload lives and mean something only to the backend
that wrote them (shm: a segment file name and an offset in it; redis: a message id whose chunks of
`chunk_num_bytes` are separate keys). With `is_inline` the payload directly follows the header.
`decode_header` validates everything it reads and raises `FrameError`; nothing here trusts input.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from moeflow.xccl.errors import FrameError

WIRE_VERSION = 1
MAGIC = b"XCCL"
PAYLOAD_ALIGN_BYTES = 64
MAX_NDIM = 32
MAX_NAME_BYTES = 1024

FLAG_INLINE = 1
FLAG_CHECKSUM = 2

# dtype name -> (wire code, bytes per element). Codes are part of the wire format: never reuse.
DTYPES: dict[str, tuple[int, int]] = {
    "bool": (1, 1),
    "uint8": (2, 1),
    "int8": (3, 1),
    "int16": (4, 2),
    "int32": (5, 4),
    "int64": (6, 8),
    "float16": (7, 2),
    "bfloat16": (8, 2),
    "float32": (9, 4),
    "float64": (10, 8),
}
_DTYPE_BY_CODE = {code: name for name, (code, _) in DTYPES.items()}

_FIXED = struct.Struct("<4sBBHHHHQQQI")
_TENSOR = struct.Struct("<BBQQ")


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Where one tensor lives in the payload and how to view it."""

    dtype: str
    """A key of `DTYPES`."""
    shape: tuple[int, ...]
    offset: int
    """Byte offset inside the payload, a multiple of `PAYLOAD_ALIGN_BYTES`."""
    num_bytes: int
    """Equals prod(shape) * itemsize; 0 for empty tensors."""


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """Everything a receiver needs to rebuild a message, except the payload bytes."""

    sender: str
    tag: str
    tensors: tuple[TensorMeta, ...]
    payload_num_bytes: int
    location: str = ""
    """Backend-specific payload address (segment name, message id); "" when inline."""
    payload_offset: int = 0
    chunk_num_bytes: int = 0
    """Size of every payload chunk but the last (redis); 0 when the payload is one piece."""
    checksum: int | None = None
    """CRC-32 of the payload, when the sender computed one."""
    is_inline: bool = False
    """The payload follows the header in the same frame."""


def check_name(kind: str, name: str) -> str:
    """Validate a group, rank or tag: a non-empty str of at most MAX_NAME_BYTES utf-8 bytes."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} must be a non-empty str, got {name!r}")
    if len(name.encode()) > MAX_NAME_BYTES or "\x00" in name:
        raise ValueError(f"{kind} {name[:40]!r}... is over {MAX_NAME_BYTES} bytes or has a NUL")
    return name


def plan_layout(specs: Sequence[tuple[str, Sequence[int]]]) -> tuple[tuple[TensorMeta, ...], int]:
    """Place tensors given as (dtype name, shape) in one payload; returns (metas, payload bytes)."""
    metas = []
    offset = 0
    for dtype, shape in specs:
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; supported: {sorted(DTYPES)}")
        dims = tuple(int(d) for d in shape)
        if len(dims) > MAX_NDIM or any(d < 0 for d in dims):
            raise ValueError(f"bad shape {dims} (at most {MAX_NDIM} non-negative dims)")
        num_bytes = math.prod(dims) * DTYPES[dtype][1]
        metas.append(TensorMeta(dtype, dims, offset, num_bytes))
        offset += -(-num_bytes // PAYLOAD_ALIGN_BYTES) * PAYLOAD_ALIGN_BYTES
    # The last tensor needs no padding after it.
    total = metas[-1].offset + metas[-1].num_bytes if metas else 0
    return tuple(metas), total


def payload_checksum(payload: bytes | bytearray | memoryview) -> int:
    """CRC-32 of a payload (zlib, about 1-2 GB/s here: opt-in, not on the hot path by default)."""
    return zlib.crc32(payload) & 0xFFFFFFFF


def verify_checksum(header: FrameHeader, payload: bytes | bytearray | memoryview) -> None:
    """Raise FrameError when the header carries a checksum that the payload does not match."""
    if header.checksum is not None and payload_checksum(payload) != header.checksum:
        raise FrameError(f"checksum mismatch in message {header.tag!r} from {header.sender!r}")


def encode_header(header: FrameHeader) -> bytes:
    """Serialize a header; raises ValueError for names or counts the format cannot carry."""
    names = [check_name(k, v).encode() for k, v in (("sender", header.sender), ("tag", header.tag))]
    location = header.location.encode()
    if len(location) > 0xFFFF or len(header.tensors) > 0xFFFF:
        raise ValueError("location over 64 KiB or more than 65535 tensors in one message")
    flags = (FLAG_INLINE if header.is_inline else 0) | (
        FLAG_CHECKSUM if header.checksum is not None else 0
    )
    parts = [
        _FIXED.pack(
            MAGIC,
            WIRE_VERSION,
            flags,
            len(header.tensors),
            len(names[0]),
            len(names[1]),
            len(location),
            header.payload_offset,
            header.payload_num_bytes,
            header.chunk_num_bytes,
            header.checksum or 0,
        ),
        names[0],
        names[1],
        location,
    ]
    for meta in header.tensors:
        parts.append(
            _TENSOR.pack(DTYPES[meta.dtype][0], len(meta.shape), meta.offset, meta.num_bytes)
        )
        parts.append(struct.pack(f"<{len(meta.shape)}q", *meta.shape))
    return b"".join(parts)


def decode_header(frame: bytes | bytearray | memoryview) -> tuple[FrameHeader, int]:
    """Parse and validate a header at the start of `frame`; returns (header, header bytes)."""
    view = memoryview(frame)
    if len(view) < _FIXED.size:
        raise FrameError(f"truncated frame: {len(view)} bytes, header needs {_FIXED.size}")
    (
        magic,
        version,
        flags,
        num_tensors,
        sender_len,
        tag_len,
        location_len,
        payload_offset,
        payload_num_bytes,
        chunk_num_bytes,
        checksum,
    ) = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise FrameError(f"not an XCCL frame (magic {bytes(magic)!r})")
    if version != WIRE_VERSION:
        raise FrameError(
            f"wire version {version} is not supported (this side speaks {WIRE_VERSION})"
        )
    pos = _FIXED.size
    strings = []
    for length in (sender_len, tag_len, location_len):
        if pos + length > len(view):
            raise FrameError("truncated frame: names run past its end")
        try:
            strings.append(bytes(view[pos : pos + length]).decode())
        except UnicodeDecodeError as exc:
            raise FrameError(f"name is not utf-8: {exc}") from None
        pos += length
    tensors = []
    for _ in range(num_tensors):
        if pos + _TENSOR.size > len(view):
            raise FrameError("truncated frame: tensor table runs past its end")
        code, ndim, offset, num_bytes = _TENSOR.unpack_from(view, pos)
        pos += _TENSOR.size
        if code not in _DTYPE_BY_CODE or ndim > MAX_NDIM or pos + 8 * ndim > len(view):
            raise FrameError(f"bad tensor entry (dtype code {code}, ndim {ndim})")
        shape = struct.unpack_from(f"<{ndim}q", view, pos)
        pos += 8 * ndim
        dtype = _DTYPE_BY_CODE[code]
        if min(shape, default=0) < 0 or math.prod(shape) * DTYPES[dtype][1] != num_bytes:
            raise FrameError(f"tensor {dtype}{list(shape)} does not take {num_bytes} bytes")
        if offset % PAYLOAD_ALIGN_BYTES or offset + num_bytes > payload_num_bytes:
            raise FrameError(f"tensor at [{offset}, +{num_bytes}) is misaligned or outside payload")
        tensors.append(TensorMeta(dtype, shape, offset, num_bytes))
    header = FrameHeader(
        sender=strings[0],
        tag=strings[1],
        tensors=tuple(tensors),
        payload_num_bytes=payload_num_bytes,
        location=strings[2],
        payload_offset=payload_offset,
        chunk_num_bytes=chunk_num_bytes,
        checksum=checksum if flags & FLAG_CHECKSUM else None,
        is_inline=bool(flags & FLAG_INLINE),
    )
    if header.is_inline and pos + payload_num_bytes > len(view):
        raise FrameError(f"inline payload of {payload_num_bytes} bytes runs past the frame end")
    return header, pos
