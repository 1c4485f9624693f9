"""The RESP2 bulk reader (moeflow.xccl.redis_bulk) against scripted replies on a socketpair.

A socketpair stands in for the byte stream only, to hit framing edge cases (values split across
reads, missing keys, oversize values, error replies) that a real server produces rarely; the
real server path is covered by tests/integration/xccl.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from moeflow.xccl.errors import BackendUnavailable
from moeflow.xccl.redis_bulk import BulkConnection, pack_command

pytestmark = pytest.mark.timeout(30)  # a hang guard; 2 s tripped on a loaded 2-core box


@pytest.fixture
def wire() -> Iterator[tuple[BulkConnection, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.settimeout(1.0)
    yield BulkConnection(ours), theirs
    ours.close()
    theirs.close()


def serve(theirs: socket.socket, reply: bytes, piece_bytes: int) -> threading.Thread:
    """Send `reply` in small pieces, after swallowing the request."""

    def run() -> None:
        theirs.recv(1 << 16)
        for i in range(0, len(reply), piece_bytes):
            theirs.sendall(reply[i : i + piece_bytes])

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_commands_are_resp_arrays_of_bulk_strings() -> None:
    assert pack_command("GETDEL", "k:1") == b"*2\r\n$6\r\nGETDEL\r\n$3\r\nk:1\r\n"
    assert pack_command("SELECT", 3) == b"*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n"


@pytest.mark.parametrize("piece_bytes", [1, 7, 1 << 16])
def test_values_land_in_their_slots_whatever_the_read_boundaries(
    wire: tuple[BulkConnection, socket.socket], piece_bytes: int
) -> None:
    connection, theirs = wire
    values = [bytes(range(256)) * 4, b"", b"\r\n$-1\r\n"]
    reply = b"".join(b"$%d\r\n%s\r\n" % (len(v), v) for v in values) + b"$-1\r\n"
    slots = [memoryview(bytearray(len(v))) for v in values] + [memoryview(bytearray(4))]
    server = serve(theirs, reply, piece_bytes)
    lengths = connection.getdel_into(["a", "b", "c", "d"], slots)
    server.join()
    assert lengths == [1024, 0, 7, -1]
    assert [bytes(s) for s in slots[:3]] == values


def test_a_value_longer_than_its_slot_is_reported_not_written(
    wire: tuple[BulkConnection, socket.socket],
) -> None:
    connection, theirs = wire
    slot = memoryview(bytearray(b"keep"))
    server = serve(theirs, b"$6\r\nforeign\r\n"[:4] + b"foreig\r\n", 3)
    assert connection.getdel_into(["k"], [slot]) == [6]
    server.join()
    assert bytes(slot) == b"keep"


def test_error_replies_and_closed_streams_raise_backend_unavailable(
    wire: tuple[BulkConnection, socket.socket],
) -> None:
    connection, theirs = wire
    server = serve(theirs, b"-ERR unknown command 'GETDEL'\r\n", 64)
    with pytest.raises(BackendUnavailable, match="unknown command"):
        connection.getdel_into(["k"], [memoryview(bytearray(1))])
    server.join()
    theirs.close()
    with pytest.raises((BackendUnavailable, OSError)):
        connection.getdel_into(["k"], [memoryview(bytearray(1))])
