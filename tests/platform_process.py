"""Start `moeflow up` as a real child process for tests, and stop it the way a user would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Platform:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float | None:
        """Read one sample from the gateway's /metrics (sum over unlisted labels)."""
        text = httpx.get(f"{self.root_url}/metrics", timeout=5).text
        total: float | None = None
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
        return total

    def engine_headers(self) -> dict[str, str]:
        """Headers for calling this platform's engines directly: `moeflow up` gives every
        engine child its internal token (MOEFLOW_INTERNAL_TOKEN), read here from one of them."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid), "-f", "moeflow.cli"],
                             capture_output=True, text=True, check=False).stdout.split()
        for pid in out:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for entry in environ:
                if entry.startswith(b"MOEFLOW_INTERNAL_TOKEN="):
                    return {"x-moeflow-internal-token": entry.split(b"=", 1)[1].decode()}
        raise RuntimeError("no engine child of this platform carries an internal token")

    def stop(self, timeout_s: float = 20.0) -> int:
        """Ctrl-C, as a user would; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


ALWAYS_SPLIT = ("--pd-min-prompt-tokens", "0", "--pd-interference-weight", "1000000")
"""``moeflow up`` flags that make a PD platform split every request of more than one output
token (by default short prompts are computed on the decode instance itself): for tests of what
travels through the split."""


def start_platform(model: str | Path, args: Sequence[str] = (), timeout_s: float = 120) -> Platform:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="moeflow-up-", suffix=".log")[1])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "moeflow.cli", "up", "--model", str(model), "--port", str(port),
            "--num-threads", "1", "--kv-cache-mb", "64", *args]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    platform = Platform(process, port, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moeflow up exited early:\n{platform.log()[-4000:]}")
        try:
            if httpx.get(f"{platform.root_url}/health", timeout=1).status_code == 200:
                return platform
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    platform.stop()
    raise RuntimeError(f"moeflow up did not become healthy:\n{platform.log()[-4000:]}")
