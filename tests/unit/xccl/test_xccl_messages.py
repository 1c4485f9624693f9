"""The frame header codec (moeflow.xccl.messages): round trips and every rejection path."""

from __future__ import annotations

import struct

import pytest

from moeflow.xccl.errors import FrameError
from moeflow.xccl.messages import (
    DTYPES,
    PAYLOAD_ALIGN_BYTES,
    FrameHeader,
    TensorMeta,
    check_name,
    decode_header,
    encode_header,
    payload_checksum,
    plan_layout,
    verify_checksum,
)

pytestmark = pytest.mark.timeout(30)  # a hang guard; 2 s tripped on a loaded 2-core box


def header(**overrides: object) -> FrameHeader:
    metas, num_bytes = plan_layout([("float32", (2, 3)), ("bool", (0,)), ("int64", ())])
    fields: dict[str, object] = {
        "sender": "prefill-0",
        "tag": "kv/req-1/3",
        "tensors": metas,
        "payload_num_bytes": num_bytes,
        "location": "xccl@m@prefill-0@ab-1.seg",
        "payload_offset": 64,
    }
    fields.update(overrides)
    return FrameHeader(**fields)  # type: ignore[arg-type]


def test_layout_aligns_every_tensor_and_does_not_pad_the_end() -> None:
    metas, num_bytes = plan_layout([("uint8", (3,)), ("float16", (5, 2)), ("bool", (0, 4))])
    assert [m.offset for m in metas] == [0, 64, 128]
    assert [m.num_bytes for m in metas] == [3, 20, 0]
    assert all(m.offset % PAYLOAD_ALIGN_BYTES == 0 for m in metas)
    assert num_bytes == 128
    assert plan_layout([]) == ((), 0)


def test_layout_rejects_unknown_dtypes_and_negative_dims() -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        plan_layout([("complex64", (2,))])
    with pytest.raises(ValueError, match="shape"):
        plan_layout([("int8", (-1,))])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"checksum": 0xDEADBEEF},
        {"is_inline": True, "location": ""},
        {"chunk_num_bytes": 4096},
        {"tensors": (), "payload_num_bytes": 0},
        {"tag": "ü/漢字/🙂"},
    ],
)
def test_header_round_trips(overrides: dict[str, object]) -> None:
    original = header(**overrides)
    payload = b"\x07" * original.payload_num_bytes if original.is_inline else b""
    frame = encode_header(original) + payload
    decoded, num_header_bytes = decode_header(frame)
    assert decoded == original
    assert frame[num_header_bytes:] == payload


def test_every_dtype_round_trips_in_the_header() -> None:
    metas, num_bytes = plan_layout([(name, (2, 1)) for name in DTYPES])
    decoded, _ = decode_header(encode_header(header(tensors=metas, payload_num_bytes=num_bytes)))
    assert [m.dtype for m in decoded.tensors] == list(DTYPES)


def test_truncated_frames_are_rejected_at_every_length() -> None:
    frame = encode_header(header())
    for length in range(len(frame)):
        with pytest.raises(FrameError):
            decode_header(frame[:length])


def test_foreign_and_future_frames_are_rejected() -> None:
    frame = bytearray(encode_header(header()))
    with pytest.raises(FrameError, match="not an XCCL frame"):
        decode_header(b"HTTP" + bytes(frame[4:]))
    frame[4] = 99
    with pytest.raises(FrameError, match="version 99"):
        decode_header(bytes(frame))


def test_tensor_entries_that_lie_about_their_size_or_place_are_rejected() -> None:
    good = header()
    for bad in (
        TensorMeta("float32", (2, 3), 0, 25),  # size does not match the shape
        TensorMeta("float32", (2, 3), 8, 24),  # misaligned
        TensorMeta("float32", (2, 3), 128, 24),  # past the payload end
    ):
        frame = encode_header(FrameHeader("a", "t", (bad,), good.payload_num_bytes))
        with pytest.raises(FrameError):
            decode_header(frame)


def test_unknown_dtype_codes_are_rejected() -> None:
    frame = bytearray(
        encode_header(
            header(tensors=(TensorMeta("int8", (1,), 0, 1),), payload_num_bytes=1, location="")
        )
    )
    table = len(frame) - struct.calcsize("<BBQQ") - 8
    frame[table] = 200
    with pytest.raises(FrameError, match="dtype code 200"):
        decode_header(bytes(frame))


def test_an_inline_payload_shorter_than_announced_is_rejected() -> None:
    frame = encode_header(header(is_inline=True, location=""))
    with pytest.raises(FrameError, match="inline payload"):
        decode_header(frame + b"\x00" * 3)


def test_checksums_detect_a_flipped_byte() -> None:
    payload = bytearray(range(256))
    checked = header(checksum=payload_checksum(payload))
    verify_checksum(checked, payload)
    payload[17] ^= 1
    with pytest.raises(FrameError, match="checksum"):
        verify_checksum(checked, payload)
    verify_checksum(header(), payload)  # no checksum: nothing to verify


def test_names_must_be_non_empty_bounded_strings() -> None:
    assert check_name("rank", "decode-3") == "decode-3"
    for bad in ("", "x" * 2000, "a\x00b", 7):
        with pytest.raises(ValueError):
            check_name("rank", bad)  # type: ignore[arg-type]
