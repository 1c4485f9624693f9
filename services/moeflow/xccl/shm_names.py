"""Names and liveness of shm endpoints: the files the shm backend keeps in `shm_dir`.

Everything lives as flat files in `ShmConfig.shm_dir` (a tmpfs, by default /dev/shm):

    xccl@{group}@{rank}.sock              the endpoint's Unix datagram socket (its doorbell)
    xccl@{group}@{rank}@{id}-{seq}.seg    a segment: a 64-byte state header, then payload bytes

Names are percent-encoded, so "@" separates fields unambiguously. Liveness comes from the socket:
connecting to it succeeds (ALIVE), is refused because the process died without cleaning up
(GONE), or finds no file (ABSENT: closed, or not started yet). A live endpoint creates its socket
before any segment and removes it after all of them, so a segment without a live socket is
stale; `remove_stale` deletes such leftovers (run it from an operator or at node start).
"""

from __future__ import annotations

import enum
import os
import socket
from pathlib import Path
from urllib.parse import quote, unquote

PREFIX = "xccl@"
_MAX_SOCKET_PATH_BYTES = 107  # sun_path is 108 bytes with the terminating NUL


class PeerState(enum.Enum):
    ALIVE = "alive"
    ABSENT = "absent"
    GONE = "gone"


def quote_name(name: str) -> str:
    """A group or rank as a file-name field (no "/", "@" or glob characters)."""
    return quote(name, safe="-_.")


def socket_path(shm_dir: Path, group: str, rank: str) -> Path:
    path = shm_dir / f"{PREFIX}{quote_name(group)}@{quote_name(rank)}.sock"
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"socket path {path} is over {_MAX_SOCKET_PATH_BYTES} bytes: "
            "use a shorter group, rank or shm_dir"
        )
    return path


def parse_name(filename: str) -> tuple[str, str, str] | None:
    """(group, rank, kind) of one of our files, kind "sock" or "seg"; None for other files."""
    if not filename.startswith(PREFIX):
        return None
    stem, _, kind = filename[len(PREFIX) :].rpartition(".")
    fields = stem.split("@")
    if kind == "sock" and len(fields) == 2 or kind == "seg" and len(fields) == 3:
        return unquote(fields[0]), unquote(fields[1]), kind
    return None


def probe(path: Path) -> PeerState:
    """Whether an endpoint is bound at `path` (a connect, no datagram is sent)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(os.fspath(path))
        except FileNotFoundError:
            return PeerState.ABSENT
        except ConnectionRefusedError:
            return PeerState.GONE
    return PeerState.ALIVE


def remove_stale(shm_dir: Path = Path("/dev/shm"), group: str | None = None) -> list[Path]:
    """Delete sockets of dead endpoints and segments without a live endpoint; returns paths.

    Safe while other endpoints run: it only removes what no live endpoint owns.
    """
    entries = [(p, parse_name(p.name)) for p in shm_dir.glob(f"{PREFIX}*")]
    ours = [(p, n) for p, n in entries if n is not None and (group is None or n[0] == group)]
    states = {(g, r): probe(p) for p, (g, r, kind) in ours if kind == "sock"}
    removed = []
    for path, (g, r, kind) in ours:
        state = states.get((g, r), PeerState.ABSENT)
        if state is PeerState.GONE or (kind == "seg" and state is not PeerState.ALIVE):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
