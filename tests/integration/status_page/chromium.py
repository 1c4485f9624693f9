"""Headless Chromium driven over the DevTools protocol, enough to load a page and read its DOM.

Debian's `chromium` (apt-get install -y chromium). No sandbox (tests run as root), no network
beyond 127.0.0.1 (background networking, component updates, sync and QUIC off), a throwaway
profile. The protocol runs over a websocket (the `websocket-client` package, which the
`kubernetes` client already depends on).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import websocket

from tests.platform_process import free_port

INSTALL_HINT = "apt-get install -y chromium"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1200,900",
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Page:
    """One page target: evaluate JavaScript and get its JSON-able result."""

    def __init__(self, ws: websocket.WebSocket) -> None:
        self._ws = ws
        self._next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        call_id = self._next_id
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:  # events arrive in between; skip them
            message = json.loads(self._ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message["result"])

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str) -> Any:
        """Evaluate until the result is truthy; fail with the page text if it never is."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; "
                                     f"the page shows:\n{text}")
            time.sleep(0.2)


@contextmanager
def open_page(url: str, timeout_s: float = 30.0) -> Iterator[Page]:
    binary = find_chromium()
    if binary is None:
        raise AssertionError(f"headless Chromium is needed for this test: {INSTALL_HINT}")
    port = free_port()
    # Chromium's helpers (renderer, crashpad) may still write into the profile for a moment
    # after the browser process exits, so the cleanup must not fail the test over it.
    with tempfile.TemporaryDirectory(prefix="moeflow-chromium-",
                                     ignore_cleanup_errors=True) as profile:
        log = Path(profile) / "chromium.log"
        argv = [binary, *FLAGS, f"--user-data-dir={profile}/data",
                f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
                "--remote-allow-origins=*", url]
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        ws: websocket.WebSocket | None = None
        try:
            ws = websocket.create_connection(_page_socket(port, process, log, timeout_s),
                                             timeout=timeout_s, suppress_origin=True)
            yield Page(ws)
        finally:
            if ws is not None:
                ws.close()
            _stop_group(process)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop Chromium and every helper it forked (they share its new session's group)."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait_s  # the helpers outlive the browser briefly
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
    process.wait()


def _page_socket(port: int, process: subprocess.Popen[bytes], log: Path, timeout_s: float
                 ) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"chromium exited with {process.returncode}:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        try:
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=1).json()
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"chromium's DevTools endpoint did not come up within {timeout_s} s:\n"
                         f"{log.read_text(errors='replace')[-3000:]}")
