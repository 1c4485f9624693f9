"""Warm pool: processes that did the imports and torch set-up, hold no model, and wait.

A worker (``python -m moeflow.coldstart.warm_pool SOCKET``) imports the engine stack, then
listens on a Unix socket for one claim, a JSON line::

    {"settings": {EngineSettings fields}, "claimed_monotonic": t,
     "weights": null | {"transport": "shm", "group": G, "rank": R, "peer": P, "tag": T}}

It answers ``{"pid": ...}`` at once and becomes that instance: weights from the node store or
the checkpoint (``settings.model_store``), or received from a live peer over XCCL (``weights``,
see ``fork.ForkServer.broadcast``); then it serves on ``settings.port``. Its cold-start record
starts at ``claimed_monotonic`` with path ``warm_pool``, so the skipped pre-load reads ~0.

``WarmPool`` is the local API (tests, benchmark, ``moeflow up`` later). On Kubernetes a
``WarmPool`` CR would map to a Deployment of such workers per node group (the socket on a
shared emptyDir or a hostPath), and a Task "claims" one by relabelling its pod and sending the
claim through a node agent; that controller is not built (docs/coldstart.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeflow.coldstart.record import ColdStartRecord

if TYPE_CHECKING:
    from moeflow.coldstart.preload import Preloaded
    from moeflow.engine.config import EngineSettings

WORKER_MODULE = "moeflow.coldstart.warm_pool"


def send_json(path: Path, message: Mapping[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
    """One request/answer exchange (a JSON line each way) on a Unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall(json.dumps(message).encode() + b"\n")
        with sock.makefile("rb") as reader:
            line = reader.readline()
    if not line:
        raise ConnectionError(f"{path}: no answer")
    answer: dict[str, Any] = json.loads(line)
    if "error" in answer:
        raise RuntimeError(f"{path}: {answer['error']}")
    return answer


def listen(path: Path) -> socket.socket:
    """Listen on ``path``, published by rename so a waiter never connects too early."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp))
    sock.listen(16)
    tmp.rename(path)
    return sock


def wait_for_path(path: Path, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited ({process.returncode}) before "
                               f"listening on {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {path} after {timeout_s} s")
        time.sleep(0.005)


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    socket_path: Path


@dataclass
class ClaimedInstance:
    process: subprocess.Popen[bytes]
    url: str

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class WarmPool:
    """``size`` idle workers; ``claim`` turns one into an instance and (optionally) refills."""

    size: int
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    refill: bool = True
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="moeflow-warm-")))
    _idle: list[Worker] = field(default_factory=list)
    _claimed: list[ClaimedInstance] = field(default_factory=list)

    def _spawn(self) -> Worker:
        path = self.log_dir / f"w{time.monotonic_ns()}.sock"
        log = (self.log_dir / f"{path.stem}.log").open("wb")
        env = {**self.env, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, str(path)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return Worker(process, path)

    def start(self, timeout_s: float = 120.0) -> WarmPool:
        """Spawn the workers and wait until every one listens."""
        new = [self._spawn() for _ in range(self.size - len(self._idle))]
        for worker in new:
            wait_for_path(worker.socket_path, worker.process, timeout_s)
        self._idle += new
        return self

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def claim(self, settings: Mapping[str, Any], *,
              weights: Mapping[str, Any] | None = None) -> ClaimedInstance:
        """Hand an idle worker an instance to become (``settings``: EngineSettings fields in
        JSON form). Returns at once; poll the URL's /health for ready."""
        if not self._idle:
            raise RuntimeError("the warm pool is empty")
        worker = self._idle.pop(0)
        send_json(worker.socket_path, {"settings": dict(settings), "weights": weights,
                                       "claimed_monotonic": time.monotonic()})
        if self.refill:
            self._idle.append(self._spawn())  # listens a few seconds later
        instance = ClaimedInstance(worker.process,
                                   f"http://{settings.get('host', '127.0.0.1')}:{settings['port']}")
        self._claimed.append(instance)
        return instance

    def close(self) -> None:
        for worker in self._idle:
            worker.process.terminate()
        for instance in self._claimed:
            instance.stop()
        for worker in self._idle:
            worker.process.wait()
        self._idle.clear()
        self._claimed.clear()


# -- the worker process ----------------------------------------------------------------------
def _receive_weights(spec: Mapping[str, Any], settings: EngineSettings) -> Preloaded:
    """Weights from a live peer over XCCL (shm), as a ``Preloaded``."""
    from moeflow.coldstart.preload import Preloaded
    from moeflow.coldstart.snapshot import unpack
    from moeflow.common.tokenizer import TextTokenizer
    from moeflow.engine.models.arch import load_arch
    from moeflow.xccl import make_transport

    started = time.monotonic()
    with make_transport(spec.get("transport", "shm"), spec["group"], spec["rank"]) as transport:
        tensors = transport.recv(spec["peer"], spec["tag"], float(spec.get("timeout_s", 60.0)))
        model = unpack([t.clone() for t in tensors])  # clone: views pin transport buffers
    arch = load_arch(settings.model_path)
    model.arch = arch
    return Preloaded(arch, TextTokenizer.from_dir(settings.model_path), model, "xccl",
                     time.monotonic() - started)


def worker_main(socket_path: Path) -> int:
    # The pre-load a claim skips: every import the engine needs, torch's first set-up, the HTTP
    # stack's first-call costs.
    import torch

    from moeflow.coldstart.launch import prewarm_http, serve_engine
    from moeflow.engine.config import EngineSettings

    torch.empty(1).sum()
    prewarm_http()  # the app's route/schema set-up and uvicorn's imports, before the claim
    listener = listen(socket_path)
    conn, _ = listener.accept()
    with conn, conn.makefile("rb") as reader:
        claim = json.loads(reader.readline())
        record = ColdStartRecord(started_s=float(claim["claimed_monotonic"]), path="warm_pool")
        record.mark_load_started()
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
    listener.close()
    socket_path.unlink(missing_ok=True)
    settings = EngineSettings.model_validate(claim["settings"])
    preloaded = _receive_weights(claim["weights"], settings) if claim.get("weights") else None
    return serve_engine(settings, record, preloaded)


if __name__ == "__main__":
    sys.exit(worker_main(Path(sys.argv[1])))
