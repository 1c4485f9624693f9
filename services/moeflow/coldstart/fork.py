"""Fork server: one process holds a model's weights and forks ready instances on demand.

``python -m moeflow.coldstart.fork SOCKET SETTINGS_JSON`` imports the engine stack, loads the
weights (node store or checkpoint), then waits on a Unix socket. Requests, one JSON line each:

- ``{"op": "fork", "port": P, "instance_id": I, "claimed_monotonic": t}``: ``os.fork()``; the
  child serves on port P; its cold-start record has path ``fork``. The child answers on the
  same connection: ``{"pid": ...}`` at once, then ``{"ready": {its /v1/coldstart record}}``
  when its sockets listen (so the caller learns ready without polling).
- ``{"op": "broadcast", "group": G, "rank": R, "peers": [...], "tag": T}``: a forked helper
  sends the weights over XCCL (shm) to warm-pool workers waiting on them, then exits.

Pre-fork template (colocated role): before listening, the server builds the whole engine once
(``LLMEngine`` with its lazily zeroed KV cache), runs the warm-up request on it, pre-faults the
weights (see ``prefault``) and builds a throwaway app (``launch.prewarm_http``). A child then
only swaps in its settings and cold-start record, builds its app and listens: the weights, the
KV cache (zero, untouched apart from the warm-up's few pages, copy-on-write) and the warmed-up
state are the parent's. It runs no warm-up of its own: the parent's was the first call.
Fork safety: the server never starts a thread. torch runs single-threaded here (an OpenMP pool
made before ``fork`` deadlocks the child's first parallel op; measured: a 2-thread matmul
before fork hangs the child's next matmul), and each child sets its own thread count. The XCCL
transport starts threads, which is why a forked helper, not the server, broadcasts.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeflow.coldstart.warm_pool import listen, send_json, wait_for_path
from moeflow.domain.coldstart import ColdStartRecord
from moeflow.domain.roles import Role
from moeflow.processes import stop_process

if TYPE_CHECKING:
    from moeflow.engine.config import EngineSettings
    from moeflow.engine.llm_engine import LLMEngine
    from moeflow.engine.models.decoder import DecoderModel
    from moeflow.engine.preloaded import Preloaded

SERVER_MODULE = "moeflow.coldstart.fork"
PREFAULT_ENV_VAR = "MOEFLOW_FORK_PREFAULT"
"""``0`` turns ``prefault`` off (fork is cheaper, each child faults the weights in itself)."""


@dataclass
class ForkedInstance:
    pid: int
    url: str
    connection: socket.socket | None = None
    """Where the child says it is ready (``wait_ready``)."""

    def wait_ready(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Block until the child listens; its cold-start record (``GET /v1/coldstart``)."""
        if self.connection is None:
            raise RuntimeError("already waited for this instance")
        try:
            self.connection.settimeout(timeout_s)
            with self.connection.makefile("rb") as reader:
                line = reader.readline()
        finally:
            self.connection.close()
            self.connection = None
        if not line:
            raise RuntimeError(f"forked instance {self.pid} exited before it was ready")
        record: dict[str, Any] = json.loads(line)["ready"]
        return record

    def stop(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
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
        """Ask for a child on ``port``; returns once it is forked (``wait_ready`` for ready)."""
        request = {"op": "fork", "port": port, "instance_id": instance_id or f"fork-{port}",
                   "claimed_monotonic": time.monotonic()}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(30.0)
            sock.connect(str(self.socket_path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            line = _read_line(sock)
        except BaseException:
            sock.close()
            raise
        if not line:
            sock.close()
            raise ConnectionError(f"{self.socket_path}: no answer")
        answer = json.loads(line)
        host = self.settings.get("host", "127.0.0.1")
        return ForkedInstance(int(answer["pid"]), f"http://{host}:{port}", sock)

    def broadcast(self, group: str, rank: str, peers: list[str], tag: str) -> int:
        """Start sending the weights to ``peers``; the helper's pid."""
        answer = send_json(self.socket_path, {"op": "broadcast", "group": group, "rank": rank,
                                              "peers": peers, "tag": tag})
        return int(answer["pid"])

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the server; it stops its children first."""
        if self.process is not None:
            stop_process(self.process, timeout_s)


def _read_line(sock: socket.socket) -> bytes:
    """One line, read byte by byte so nothing after it is consumed (the ready line follows)."""
    out = bytearray()
    while not out.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        out += chunk
    return bytes(out)


# -- the server process ----------------------------------------------------------------------
class _Stop(Exception):
    pass


_MADV_POPULATE_READ = 22  # Linux 5.14+
_PAGE = os.sysconf("SC_PAGE_SIZE")


def prefault(model: DecoderModel) -> int:
    """Give the weights' pages page-table entries that a ``fork`` copies into each child.

    fork copies the page table only for mappings that have anonymous pages: a private file
    mapping (weights mapped from the node store) that was never written gets none, and every
    child faults the whole model in again (~9000 faults for SmolLM2-135M). Rewriting one
    element of each such storage with its own value gives the mapping an anonymous page (one
    4 KiB copy, same bytes), then ``MADV_POPULATE_READ`` maps the rest up front. Weights in
    anonymous memory (loaded from a checkpoint) only get populated. Returns the bytes covered.
    """
    import torch

    from moeflow.coldstart.snapshot import pack

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in pack(model)[1:]}
    covered = 0
    with torch.no_grad():
        for storage in storages.values():
            if storage.nbytes() == 0:
                continue
            storage[0] = storage[0]  # same byte back: the page becomes anonymous, not different
            start = storage.data_ptr() - storage.data_ptr() % _PAGE
            end = storage.data_ptr() + storage.nbytes()
            if libc.madvise(start, end - start, _MADV_POPULATE_READ) == 0:
                covered += end - start
    return covered


def build_template(settings: EngineSettings, preloaded: Preloaded) -> LLMEngine:
    """The engine every child starts from: built, warmed up and with its HTTP stack warmed,
    single-threaded (see the module docstring)."""
    import torch

    from moeflow.coldstart.launch import build_engine, prewarm_http

    record = ColdStartRecord(started_s=time.monotonic(), path="fork", weights_source="fork")
    engine = build_engine(settings.model_copy(update={"num_threads": 1}), record, preloaded)
    torch.set_num_threads(1)
    if os.environ.get(PREFAULT_ENV_VAR, "1") != "0":
        prefault(preloaded.model)
    prewarm_http(engine)
    return engine


def _child_serve_template(template: LLMEngine, settings: EngineSettings,
                          request: Mapping[str, Any], conn: socket.socket,
                          forked_s: float) -> int:
    import torch

    from moeflow.coldstart.launch import serve_engine

    record = ColdStartRecord(started_s=float(request["claimed_monotonic"]), path="fork",
                             weights_source="fork", load_started_s=forked_s)
    child = settings.model_copy(update={"port": int(request["port"]),
                                        "instance_id": str(request["instance_id"])})
    torch.set_num_threads(child.num_threads or len(os.sched_getaffinity(0)))
    template.settings = child
    template.cold_start = record
    template.created_unix = int(time.time())
    record.mark_load_done()

    def ready(rec: ColdStartRecord) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"ready": rec.as_dict()}).encode() + b"\n")
        conn.close()

    return serve_engine(child, record, engine=template, on_ready=ready)


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
    template = build_template(settings, preloaded) if settings.role is Role.COLOCATED else None
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
                        if request["op"] != "fork":
                            conn.close()
                            code = _child_broadcast(preloaded, request)
                        else:
                            conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
                            if template is not None:
                                code = _child_serve_template(template, settings, request, conn,
                                                             forked_s)
                            else:
                                conn.close()
                                code = _child_serve(settings, preloaded, request, forked_s)
                    finally:
                        os._exit(code)
                children.add(pid)
                if request["op"] != "fork":  # a forked instance answers for itself
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
