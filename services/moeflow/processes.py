"""Stopping child processes: the one rule every part of MoEFlow uses.

``stop_process(process, grace_s)`` sends SIGTERM (the child runs its graceful shutdown: an
engine finishes or drains its requests, redis-server exits cleanly), waits up to ``grace_s``,
then sends SIGKILL and reaps the child. ``stop_processes`` does the same for several children
at once: all get SIGTERM first and share one grace period, so they shut down in parallel.

Both are idempotent (a child that already exited is only reaped) and never raise for a child
that is gone. Pure standard library, so every layer may import it.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterable
from typing import Any

DEFAULT_GRACE_S = 10.0


def stop_process(process: subprocess.Popen[Any], grace_s: float = DEFAULT_GRACE_S) -> int:
    """SIGTERM, wait up to ``grace_s``, SIGKILL; returns the exit code (negative: signal)."""
    stop_processes([process], grace_s)
    return int(process.returncode)


def stop_processes(processes: Iterable[subprocess.Popen[Any]],
                   grace_s: float = DEFAULT_GRACE_S) -> None:
    """``stop_process`` for many children, in parallel, within one shared grace period."""
    children = list(processes)
    for child in children:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # exited between poll and signal
                child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            child.wait()
