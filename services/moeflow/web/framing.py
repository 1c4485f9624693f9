"""NDJSON framing between processes: one JSON document per line, lines end at b"\\n" only.

JSON escapes a newline inside a string, so b"\\n" can only end a line; but text decoders that
split on every Unicode line boundary (U+2028, U+2029, U+0085, form feed, ...) cut a document
that carries such a character in a string. So the reader here works on bytes and splits on
b"\\n" alone, whatever text the model produced. Lines are bounded (``max_line_bytes``).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

from pydantic import BaseModel

MAX_LINE_BYTES = 16 * 1024 * 1024


class FrameTooLargeError(ValueError):
    """A line grew past the bound without ending: the peer is broken or hostile."""


def encode_line(message: BaseModel) -> bytes:
    """One message as one NDJSON line."""
    return message.model_dump_json().encode() + b"\n"


async def read_lines(chunks: AsyncIterable[bytes], *,
                     max_line_bytes: int = MAX_LINE_BYTES) -> AsyncIterator[bytes]:
    """Yield complete lines (without b"\\n"; empty lines skipped) from a byte stream. A last
    line without its b"\\n" is yielded too: the caller decides whether the stream ended early."""
    pending = bytearray()
    async for chunk in chunks:
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) != -1:
            if end > start:
                yield bytes(pending[start:end])
            start = end + 1
        del pending[:start]
        if len(pending) > max_line_bytes:
            raise FrameTooLargeError(f"a line exceeded {max_line_bytes} bytes")
    if pending:
        yield bytes(pending)
