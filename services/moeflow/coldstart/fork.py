"""Fork server: one process holds a model's weights and forks ready instances on demand.

``python -m moeflow.coldstart.fork SOCKET SETTINGS_JSON`` imports the engine stack, loads the
weights (node store or checkpoint), then waits on a Unix socket. Requests, one JSON line each:

- ``{"op": "fork", "port": P, "instance_id": I, "claimed_monotonic": t}``: ``os.fork()``; the
  child shares the weights copy-on-write (the engine never writes them), allocates its own KV
  cache and serves on port P; its cold-start record has path ``fork``. Answer ``{"pid": ...}``.
- ``{"op": "broadcast", "group": G, "rank": R, "peers": [...], "tag": T}``: a forked helper
  sends the weights over XCCL (shm) to warm-pool workers waiting on them, then exits.

Fork safety: the server never starts a thread. torch runs single-threaded here (an OpenMP pool
made before ``fork`` deadlocks the child's first parallel op; measured: a 2-thread matmul
before fork hangs the child's next matmul), and each child sets its own thread count. The XCCL
transport starts threads, which is why a forked helper, not the server, broadcasts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeflow.coldstart.record import ColdStartRecord
from moeflow.coldstart.warm_pool import listen, send_json, wait_for_path

if TYPE_CHECKING:
    from moeflow.coldstart.preload import Preloaded
    from moeflow.engine.config import EngineSettings

SERVER_MODULE = "moeflow.coldstart.fork"


@dataclass
class ForkedInstance:
    pid: int
    url: str

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)


@dataclass
class ForkServer:
    """Client side: start the server process, fork instances from it, stop everything."""

    settings: Mapping[str, Any]
    """EngineSettings fields (JSON form) shared by every child; port and id vary per fork."""
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="moeflow-fork-")))
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.log_dir / "fork.sock"

    def start(self, timeout_s: float = 300.0) -> ForkServer:
        log = (self.log_dir / "server.log").open("wb")
        env = {**self.env, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", SERVER_MODULE, str(self.socket_path),
             json.dumps(dict(self.settings))],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        wait_for_path(self.socket_path, self.process, timeout_s)
        return self

    def fork(self, port: int, instance_id: str = "") -> ForkedInstance:
        answer = send_json(self.socket_path, {
            "op": "fork", "port": port, "instance_id": instance_id or f"fork-{port}",
            "claimed_monotonic": time.monotonic()})
        host = self.settings.get("host", "127.0.0.1")
        return ForkedInstance(int(answer["pid"]), f"http://{host}:{port}")

    def broadcast(self, group: str, rank: str, peers: list[str], tag: str) -> int:
        """Start sending the weights to ``peers``; the helper's pid."""
        answer = send_json(self.socket_path, {"op": "broadcast", "group": group, "rank": rank,
                                              "peers": peers, "tag": tag})
        return int(answer["pid"])

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the server; it stops its children first."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- the server process ----------------------------------------------------------------------
class _Stop(Exception):
    pass


def _child_serve(settings: EngineSettings, preloaded: Preloaded, request: Mapping[str, Any],
                 forked_s: float) -> int:
    import torch

    from moeflow.coldstart.launch import serve_engine

    record = ColdStartRecord(started_s=float(request["claimed_monotonic"]), path="fork",
                             weights_source="fork", load_started_s=forked_s)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    child = settings.model_copy(update={"port": int(request["port"]),
                                        "instance_id": str(request["instance_id"])})
    return serve_engine(child, record, preloaded)


def _child_broadcast(preloaded: Preloaded, request: Mapping[str, Any]) -> int:
    from moeflow.coldstart.snapshot import pack
    from moeflow.xccl import make_transport

    with make_transport("shm", request["group"], request["rank"]) as transport:
        transport.broadcast(request["peers"], request["tag"], pack(preloaded.model),
                            timeout_s=float(request.get("timeout_s", 120.0)))
        # keep the endpoint alive until every peer has taken its message over
        time.sleep(float(request.get("linger_s", 5.0)))
    return 0


def server_main(socket_path: Path, settings_json: str) -> int:
    import torch

    import moeflow.coldstart.launch  # noqa: F401 - the children's imports, paid once here
    from moeflow.coldstart.preload import preload, store_from
    from moeflow.engine.config import EngineSettings

    torch.set_num_threads(1)  # see the module docstring: no OpenMP pool before fork
    settings = EngineSettings.model_validate(json.loads(settings_json))
    preloaded = preload(settings, store_from(settings.model_store))
    children: set[int] = set()

    def stop(*_: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    listener = listen(socket_path)
    listener.settimeout(0.2)
    try:
        while True:
            while children:  # reap
                pid, _ = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                children.discard(pid)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, conn.makefile("rb") as reader:
                request = json.loads(reader.readline())
                pid = os.fork()
                if pid == 0:  # the child never returns into this loop
                    forked_s = time.monotonic()
                    code = 1
                    try:
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        listener.close()
                        conn.close()
                        if request["op"] == "fork":
                            code = _child_serve(settings, preloaded, request, forked_s)
                        else:
                            code = _child_broadcast(preloaded, request)
                    finally:
                        os._exit(code)
                children.add(pid)
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    except _Stop:
        pass
    finally:
        listener.close()
        socket_path.unlink(missing_ok=True)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(server_main(Path(sys.argv[1]), sys.argv[2]))
