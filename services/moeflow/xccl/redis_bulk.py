"""The bulk read path of the Redis backend: RESP2 over a raw socket, replies straight into place.

redis-py's pure-Python parser builds one bytes object per reply through a growing buffer, which
caps GET at about 0.6-1 GB/s on a 2-core machine (docs/benchmarks.md, XCCL).
`BulkConnection.getdel_into` instead pipelines GETDEL for all chunks of a message and
`recv_into`s every reply directly into the destination buffer: one kernel-to-user copy per byte.
It handles only what that path needs (AUTH, SELECT, GETDEL; plain TCP or Unix sockets); TLS URLs
use redis-py instead (see `BulkConnection.supports`). Used only by redis_backend.py, which owns
the connection and its lifetime. Any error leaves the stream in an unknown state, so callers
drop the connection.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from moeflow.xccl.errors import BackendUnavailable

_CRLF = b"\r\n"


def pack_command(*args: bytes | str | int) -> bytes:
    """One RESP2 command as an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts += [b"$%d\r\n" % len(data), data, _CRLF]
    return b"".join(parts)


class BulkConnection:
    """A raw connection that reads GETDEL replies into caller buffers. Not thread-safe."""

    @staticmethod
    def supports(url: str) -> bool:
        return urlsplit(url).scheme in ("redis", "unix")

    def __init__(self, sock: socket.socket) -> None:
        """Wrap a connected socket (already authenticated and on the right database)."""
        self._sock = sock
        self._buffer = bytearray(1 << 16)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0

    @classmethod
    def open(cls, url: str, timeout_s: float, *, password: str | None = None
             ) -> BulkConnection:
        """Connect to a redis:// or unix:// URL, AUTH and SELECT as the URL says; `password`
        when the URL has none (as redis-py does)."""
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        address: str | tuple[str, int]
        if parts.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = parts.path
            db = int(query.get("db", ["0"])[0])
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            address = (parts.hostname or "localhost", parts.port or 6379)
            db = int(parts.path.strip("/") or query.get("db", ["0"])[0])
        connection = cls(sock)
        try:
            sock.settimeout(timeout_s)
            sock.connect(address)
            secret = unquote(parts.password) if parts.password else password
            if secret:
                user = [unquote(parts.username)] if parts.username else []
                connection._call("AUTH", *user, secret)
            if db:
                connection._call("SELECT", db)
        except (OSError, BackendUnavailable) as exc:
            connection.close()
            raise BackendUnavailable(f"redis bulk connection to {address}: {exc}") from exc
        return connection

    def close(self) -> None:
        self._sock.close()

    def getdel_into(self, keys: Sequence[str], slots: Sequence[memoryview]) -> list[int]:
        """GETDEL every key into its slot; returns each value's length, -1 when missing.

        A value longer than its slot is read and discarded, and reported with its length, so
        the caller can tell a truncated or foreign value from a good one.
        """
        self._sock.sendall(b"".join(pack_command("GETDEL", key) for key in keys))
        return [self._read_bulk_into(slot) for slot in slots]

    def _call(self, *args: bytes | str | int) -> bytes:
        self._sock.sendall(pack_command(*args))
        line = self._read_line()
        if line[:1] == b"-":
            raise BackendUnavailable(
                f"redis {args[0]!s} failed: {line[1:].decode(errors='replace')}"
            )
        return line

    def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buffer):  # compact: keep the unread tail at the front
            tail = self._end - self._start
            if tail == len(self._buffer):
                raise BackendUnavailable("redis reply line over 64 KiB")
            self._buffer[:tail] = self._buffer[self._start : self._end]
            self._start, self._end = 0, tail
        num_bytes = self._sock.recv_into(self._view[self._end :])
        if num_bytes == 0:
            raise BackendUnavailable("redis closed the bulk connection")
        self._end += num_bytes

    def _read_line(self) -> bytes:
        while (eol := self._buffer.find(_CRLF, self._start, self._end)) < 0:
            self._fill()
        line = bytes(self._buffer[self._start : eol])
        self._start = eol + 2
        return line

    def _read_bulk_into(self, slot: memoryview) -> int:
        line = self._read_line()
        if line[:1] == b"-":
            raise BackendUnavailable(f"redis GETDEL failed: {line[1:].decode(errors='replace')}")
        if line[:1] != b"$":
            raise BackendUnavailable(f"unexpected redis reply {line[:40]!r}")
        length = int(line[1:])
        if length < 0:
            return -1
        target = slot if length <= len(slot) else memoryview(bytearray(length))
        buffered = min(self._end - self._start, length)
        target[:buffered] = self._view[self._start : self._start + buffered]
        self._start += buffered
        done = buffered
        while done < length:  # the bulk of a big value: straight from the socket into place
            num_bytes = self._sock.recv_into(target[done:length])
            if num_bytes == 0:
                raise BackendUnavailable("redis closed the bulk connection")
            done += num_bytes
        while self._end - self._start < 2:
            self._fill()
        self._start += 2  # the CRLF after the value
        return length
