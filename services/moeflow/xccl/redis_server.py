"""A private redis-server for the local runtime, tests and benchmarks (no URL given).

`start_local_redis(dir, port)` runs `redis-server` as a child process with persistence off
(`--save '' --appendonly no`), listening on a Unix socket in `dir` (port None) or on loopback TCP,
waits until it answers PING, and returns a `LocalRedis` whose `url` feeds `make_transport`.
Readiness is checked with a raw RESP PING so this module does not import redis (only
redis_backend.py does). Stopping sends SIGTERM, then SIGKILL after a grace period
(`moeflow.processes.stop_process`). Started again on the same port and folder (the local
runtime does that when it dies), it is a new, empty server: the XCCL backend re-registers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from moeflow.processes import stop_process
from moeflow.xccl.errors import LocalRedisError

_INSTALL_HINT = "install it with `apt-get install redis-server` (Debian/Ubuntu)"


class LocalRedis:
    """A running private redis-server; a context manager that stops it on exit."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        url: str,
        address: str | tuple[str, int],
        log_path: Path,
    ) -> None:
        self.process = process
        self.url = url
        """redis://127.0.0.1:PORT/0 or unix:///DIR/redis.sock?db=0."""
        self.address = address
        self.log_path = log_path

    def stop(self, grace_s: float = 5.0) -> None:
        """Terminate the server (idempotent)."""
        stop_process(self.process, grace_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _ping(address: str | tuple[str, int], timeout_s: float) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(address)
            sock.sendall(b"PING\r\n")
            # NOAUTH: a server with requirepass, up and answering
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def start_local_redis(
    dir: Path,
    port: int | None = None,
    *,
    ready_timeout_s: float = 10.0,
    executable: str = "redis-server",
    requirepass: str | None = None,
) -> LocalRedis:
    """Start redis-server with its files in `dir`; Unix socket when `port` is None.
    `requirepass`: clients must AUTH with it (the URL stays without it; it is on the
    command line, so for tests and single-user machines only).

    Raises LocalRedisError when the executable is missing (naming the apt package), when it
    exits early (with the tail of its log), or when it is not ready within `ready_timeout_s`.
    """
    binary = shutil.which(executable)
    if binary is None:
        raise LocalRedisError(f"{executable!r} is not on PATH: {_INSTALL_HINT}")
    dir = Path(dir).resolve()
    dir.mkdir(parents=True, exist_ok=True)
    log_path = dir / "redis.log"
    args = [
        binary,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        os.fspath(dir),
        "--logfile",
        os.fspath(log_path),
        "--daemonize",
        "no",
    ]
    if requirepass:
        args += ["--requirepass", requirepass]
    address: str | tuple[str, int]
    if port is None:
        sock_path = dir / "redis.sock"
        if len(os.fsencode(sock_path)) > 107:
            raise LocalRedisError(f"unix socket path {sock_path} is too long: use a shorter dir")
        sock_path.unlink(missing_ok=True)
        args += ["--port", "0", "--unixsocket", os.fspath(sock_path), "--unixsocketperm", "700"]
        address, url = os.fspath(sock_path), f"unix://{sock_path}?db=0"
    else:
        args += ["--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes"]
        address, url = ("127.0.0.1", port), f"redis://127.0.0.1:{port}/0"
    process = subprocess.Popen(  # own process group: a terminal's Ctrl-C is for the parent
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        process_group=0,
    )
    server = LocalRedis(process, url, address, log_path)
    deadline = time.monotonic() + ready_timeout_s
    while not _ping(address, timeout_s=0.5):
        if process.poll() is not None:
            raise LocalRedisError(
                f"redis-server exited with {process.returncode}: {_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            server.stop()
            raise LocalRedisError(
                f"redis-server not ready after {ready_timeout_s} s: {_tail(log_path)}"
            )
        time.sleep(0.02)
    return server


def _tail(path: Path, num_lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return f"(no log at {path})"
