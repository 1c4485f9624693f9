"""Warm pool: processes that did the imports and torch set-up, hold no model, and wait.

A worker (``python -m moeflow.coldstart.warm_pool SOCKET``) imports the engine stack, then
listens on a Unix socket for one claim, a JSON line::

    {"settings": {EngineSettings fields}, "claimed_monotonic": t,
     "weights": null | {"transport": "shm", "group": G, "rank": R, "peer": P, "tag": T}}

It answers ``{"pid": ...}`` at once and becomes that instance: weights from the node store or
the checkpoint (``settings.model_store``), or received from a live peer over XCCL (``weights``,
see ``fork.ForkServer.broadcast``); then it serves on ``settings.port``. Its cold-start record
starts at ``claimed_monotonic`` with path ``warm_pool``, so the skipped pre-load reads ~0.

``WarmPool`` is the local API (tests, benchmark, ``moeflow up`` later).

On Kubernetes (a WarmPool CR's Pod, ``moeflow warm-pool --port P``) the worker also takes its
claim over HTTP: ``POST /v1/claim`` with the same message (``claimed_monotonic`` optional: the
claimer's clock is another machine's, so the worker's receipt time is used). 202 ``{"pid"}``
accepted, 400 a claim it cannot serve (the message says why), 409 already claimed. It then
becomes the engine on that same listening socket (never closed, so no gap and no other
process can take the port): ``GET /health`` answers 503 until the engine serves, so a Pod's
readiness probe passes only once the claimed model is loaded, as for an engine Pod. A claim is
also written to ``claim_file`` (a Pod-local emptyDir): a restarted container (same command)
claims itself with it at once instead of waiting for a claim that will not come again.

Health as on an engine: ``GET /health/live`` 200 while the worker runs, ``GET /health/ready``
(= ``/health``) 503 until the claimed engine serves. With ``MOEFLOW_INTERNAL_TOKEN`` set, the
HTTP claim (and ``GET /v1/warm``) needs it in ``x-moeflow-internal-token`` (401 otherwise),
and the claimed engine uses this worker's token whatever the claim's settings say.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeflow.domain.coldstart import ColdStartRecord
from moeflow.domain.roles import Role
from moeflow.processes import stop_process, stop_processes
from moeflow.web.errors import error_body
from moeflow.web.internal_auth import (
    INTERNAL_TOKEN_HEADER,
    OPEN_PATHS,
    is_valid_token,
    token_from_env,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from moeflow.engine.config import EngineSettings
    from moeflow.engine.preloaded import Preloaded

WORKER_MODULE = "moeflow.coldstart.warm_pool"
CLAIM_PATH = "/v1/claim"


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
        stop_process(self.process, timeout_s)


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
        stop_processes([w.process for w in self._idle] + [i.process for i in self._claimed])
        self._idle.clear()
        self._claimed.clear()


# -- the worker process ----------------------------------------------------------------------
def _receive_weights(spec: Mapping[str, Any], settings: EngineSettings) -> Preloaded:
    """Weights from a live peer over XCCL (shm), as a ``Preloaded``."""
    from moeflow.coldstart.snapshot import unpack
    from moeflow.engine.models.arch import load_arch
    from moeflow.engine.preloaded import Preloaded
    from moeflow.text.tokenizer import TextTokenizer
    from moeflow.xccl import make_transport

    started = time.monotonic()
    with make_transport(spec.get("transport", "shm"), spec["group"], spec["rank"]) as transport:
        tensors = transport.recv(spec["peer"], spec["tag"], float(spec.get("timeout_s", 60.0)))
        model = unpack([t.clone() for t in tensors])  # clone: views pin transport buffers
    arch = load_arch(settings.model_path)
    model.arch = arch
    return Preloaded(arch, TextTokenizer.from_dir(settings.model_path), model, "xccl",
                     time.monotonic() - started)


class ClaimError(ValueError):
    """A claim this worker cannot serve (HTTP 400): the message says which field and why."""


class AlreadyClaimed(RuntimeError):
    """A second claim (HTTP 409): a worker becomes one instance, once."""


@dataclass(frozen=True)
class Claim:
    settings: EngineSettings
    weights: Mapping[str, Any] | None
    claimed_monotonic: float
    message: Mapping[str, Any]


def parse_claim(message: Any, *, port: int | None = None) -> Claim:
    """Validate a claim message; ``port``: the port this worker listens on (the settings must
    name it, the engine serves on that socket)."""
    from pydantic import ValidationError

    from moeflow.engine.config import EngineSettings

    if not isinstance(message, Mapping) or not isinstance(message.get("settings"), Mapping):
        raise ClaimError('a claim is a JSON object with "settings" (EngineSettings fields)')
    try:
        settings = EngineSettings.model_validate(message["settings"])
    except ValidationError as e:
        fields = "; ".join(f"settings.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                           for err in e.errors())
        raise ClaimError(fields) from None
    if settings.role is Role.EXPERT:
        raise ClaimError("settings.role: expert instances run their own app, not a warm worker")
    if port is not None and settings.port != port:
        raise ClaimError(f"settings.port: {settings.port}, but this worker listens on {port}")
    weights = message.get("weights")
    if weights is not None and not isinstance(weights, Mapping):
        raise ClaimError('"weights" must be null or an object')
    claimed = message.get("claimed_monotonic")
    return Claim(settings, weights,
                 float(claimed) if isinstance(claimed, int | float) else time.monotonic(),
                 dict(message))


class _ClaimBox:
    """The one claim, from whichever channel comes first (Unix socket, HTTP)."""

    def __init__(self, port: int | None) -> None:
        self.port = port
        self.claim: Claim | None = None
        self.taken = threading.Event()
        self._lock = threading.Lock()

    def take(self, message: Any) -> Claim:
        claim = parse_claim(message, port=self.port)  # ClaimError: nothing is taken
        with self._lock:
            if self.claim is not None:
                raise AlreadyClaimed("this worker is already claimed")
            self.claim = claim
        self.taken.set()
        return claim


def _serve_unix_claims(listener: socket.socket, box: _ClaimBox) -> None:
    """Answer claims on the Unix socket until it is closed (one JSON line each way)."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn, conn.makefile("rb") as reader:
            try:
                box.take(json.loads(reader.readline()))
                answer: dict[str, Any] = {"pid": os.getpid()}
            except (ClaimError, AlreadyClaimed, ValueError) as e:
                answer = {"error": str(e)}
            conn.sendall(json.dumps(answer).encode() + b"\n")


def _claim_handler(box: _ClaimBox, token: str | None = None) -> type[BaseHTTPRequestHandler]:
    """``token``: the internal token every path but health needs (None: open)."""
    expected = token.encode() if token else None

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _is_authorized(self) -> bool:
            if expected is None or self.path in OPEN_PATHS:
                return True
            presented = self.headers.get(INTERNAL_TOKEN_HEADER)
            if is_valid_token(presented.encode() if presented is not None else None, expected):
                return True
            what = "missing" if presented is None else "invalid"
            self._answer(401, error_body(
                f"{what} internal token: this worker takes claims from the platform only",
                "authentication_error", "invalid_internal_token"))
            return False

        def do_GET(self) -> None:  # noqa: N802
            if not self._is_authorized():
                return
            state = "claimed" if box.taken.is_set() else "idle"
            if self.path == "/health/live":  # the worker runs; it waits or loads
                self._answer(200, {"status": "ok"})
            elif self.path in ("/health", "/health/ready"):  # not ready: no engine serves yet
                self._answer(503, {"status": "loading" if state == "claimed" else "warm"})
            elif self.path == "/v1/warm":
                self._answer(200, {"state": state, "pid": os.getpid()})
            else:
                self._answer(404, {"error": f"{self.path}: not found on a warm worker"})

        def do_POST(self) -> None:  # noqa: N802
            if not self._is_authorized():
                return
            if self.path != CLAIM_PATH:
                self._answer(404, {"error": f"{self.path}: not found on a warm worker"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                box.take(json.loads(self.rfile.read(length) or b"null"))
            except AlreadyClaimed as e:
                self._answer(409, {"error": str(e)})
            except (ClaimError, ValueError) as e:
                self._answer(400, {"error": f"bad claim: {e}"})
            else:
                self._answer(202, {"pid": os.getpid(), "state": "claimed"})

        def log_message(self, *_: object) -> None:
            return None

    return Handler


def _claim_server(sock: socket.socket, box: _ClaimBox,
                  token: str | None = None) -> ThreadingHTTPServer:
    """The pre-claim HTTP server, on an already listening socket (kept open when it stops)."""
    server = ThreadingHTTPServer(sock.getsockname()[:2], _claim_handler(box, token),
                                 bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), name="warm-claims",
                     daemon=True).start()
    return server


def refuse_claims(app: FastAPI) -> None:
    """The claimed engine keeps answering claims: 409, as the worker did."""
    from fastapi.responses import JSONResponse

    async def claimed() -> JSONResponse:
        return JSONResponse({"error": "this worker is already claimed"}, status_code=409)

    app.add_api_route(CLAIM_PATH, claimed, methods=["POST"])


def worker_main(socket_path: Path | None, *, port: int | None = None, host: str = "0.0.0.0",
                claim_file: Path | None = None) -> int:
    """Pre-load, wait for one claim (Unix socket ``socket_path`` and/or HTTP on ``port``),
    then serve it; the exit code."""
    # The pre-load a claim skips: every import the engine needs, torch's first set-up, the HTTP
    # stack's first-call costs.
    import torch

    from moeflow.coldstart.launch import build_engine, prewarm_http, serve_engine

    torch.empty(1).sum()
    prewarm_http()  # the app's route/schema set-up and uvicorn's imports, before the claim
    box = _ClaimBox(port)
    token = token_from_env()
    http_sock = socket.create_server((host, port), backlog=128) if port is not None else None
    server = _claim_server(http_sock, box, token) if http_sock is not None else None
    listener = listen(socket_path) if socket_path is not None else None
    if listener is not None:
        threading.Thread(target=_serve_unix_claims, args=(listener, box), name="warm-unix",
                         daemon=True).start()
    if claim_file is not None and claim_file.exists():  # a restarted, claimed container
        box.take({**json.loads(claim_file.read_text()), "claimed_monotonic": None})
    box.taken.wait()
    claim = box.claim
    assert claim is not None
    if claim_file is not None and not claim_file.exists():
        claim_file.write_text(json.dumps(claim.message))
    if listener is not None:
        listener.close()  # connections queued there get EOF: already claimed
        assert socket_path is not None
        socket_path.unlink(missing_ok=True)
    record = ColdStartRecord(started_s=claim.claimed_monotonic, path="warm_pool")
    record.mark_load_started()
    settings = claim.settings
    if token is not None:  # the platform's token, never one a claim (or a dump of it) names
        from pydantic import SecretStr

        settings = settings.model_copy(update={"internal_token": SecretStr(token)})
    preloaded = _receive_weights(claim.weights, settings) if claim.weights else None
    if server is None:
        return serve_engine(settings, record, preloaded)
    assert http_sock is not None
    engine = build_engine(settings, record, preloaded)
    server.shutdown()  # the socket stays open: requests wait in its backlog for the engine
    return serve_engine(settings, record, engine=engine, sockets=[http_sock],
                        customize=refuse_claims)


if __name__ == "__main__":
    sys.exit(worker_main(Path(sys.argv[1])))
