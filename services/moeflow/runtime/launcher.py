"""How `moeflow up` starts, watches, drains and stops engine instances.

``EngineLauncher`` is the interface the local runtime (``local.py``) and the local scaler
(``scaler.py``) both use; ``ProcessLauncher`` implements it with child processes running
``python -m moeflow.cli engine`` with the task's argv (what a Pod would run), the platform's
``EngineOptions`` as ``MOEFLOW_ENGINE_*`` variables and its internal token as
``MOEFLOW_INTERNAL_TOKEN``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from moeflow.domain.messages import EngineStats
from moeflow.domain.plan import TaskPlan
from moeflow.domain.roles import Role
from moeflow.engine.config import EngineOptions
from moeflow.processes import stop_process
from moeflow.web.internal_auth import INTERNAL_TOKEN_ENV, internal_headers

logger = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """An engine exited while starting, or did not answer /health in time."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"engine {name} {reason}")
        self.reason = reason
        """Why, without the engine's name (e.g. "exited with code 1 while starting")."""


@dataclass
class EngineHandle:
    """One started engine process (a new handle per start: a restart gets a new one)."""

    task: TaskPlan
    process: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def url(self) -> str:
        return f"http://{self.task.host}:{self.task.port}"

    @property
    def role(self) -> Role:
        return self.task.role


class EngineLauncher(Protocol):
    """Start, watch, drain and stop engine instances of one platform."""

    def start(self, task: TaskPlan) -> EngineHandle:
        """Start the instance ``task`` describes; returns at once (see ``wait_ready``)."""
        ...

    def wait_ready(self, handle: EngineHandle, timeout_s: float) -> None:
        """Block until it answers /health; ``EngineStartError`` if it exits first or takes
        longer than ``timeout_s``."""
        ...

    def is_alive(self, handle: EngineHandle) -> bool: ...

    def exit_code(self, handle: EngineHandle) -> int | None:
        """The exit code (negative: killed by that signal), None while it runs."""
        ...

    def stats(self, handle: EngineHandle) -> EngineStats | None:
        """Its ``/v1/stats``, or None when it does not answer."""
        ...

    def drain(self, handle: EngineHandle, timeout_s: float) -> bool:
        """Ask it to take no new requests and wait up to ``timeout_s`` until those in flight
        are done; True if it went idle (or is gone)."""
        ...

    def stop(self, handle: EngineHandle, grace_s: float) -> int:
        """SIGTERM, SIGKILL after ``grace_s``; the exit code."""
        ...


@dataclass
class ProcessLauncher:
    """``EngineLauncher`` over child processes of this one."""

    options: EngineOptions
    log_level: str = "INFO"
    internal_token: str | None = None
    http_timeout_s: float = 2.0
    _http: httpx.Client = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._http = httpx.Client(timeout=self.http_timeout_s,
                                  headers=internal_headers(self.internal_token))

    def close(self) -> None:
        self._http.close()

    def child_env(self) -> dict[str, str]:
        """This process's environment, the options on top, and the internal token."""
        env = dict(os.environ)
        for key, value in self.options.as_env().items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        if self.internal_token:
            env[INTERNAL_TOKEN_ENV] = self.internal_token
        return env

    def argv(self, task: TaskPlan) -> list[str]:
        return [sys.executable, "-m", "moeflow.cli", "--log-level", self.log_level,
                *task.argv[1:]]

    def start(self, task: TaskPlan) -> EngineHandle:
        # its own process group: a Ctrl-C in the terminal reaches `moeflow up` only, which
        # stops the gateway first and then its children (no restart races a shutdown)
        process = subprocess.Popen(self.argv(task), env=self.child_env(), process_group=0)
        handle = EngineHandle(task, process)
        logger.info("started engine %s (pid %d) at %s", handle.name, handle.process.pid,
                    handle.url)
        return handle

    def wait_ready(self, handle: EngineHandle, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = handle.process.poll()
            if code is not None:
                raise EngineStartError(handle.name, f"exited with code {code} while starting")
            try:
                if self._http.get(f"{handle.url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise EngineStartError(handle.name, f"was not ready within {timeout_s:.0f} s")

    def is_alive(self, handle: EngineHandle) -> bool:
        return handle.process.poll() is None

    def exit_code(self, handle: EngineHandle) -> int | None:
        return handle.process.poll()

    def stats(self, handle: EngineHandle) -> EngineStats | None:
        try:
            response = self._http.get(f"{handle.url}/v1/stats")
            response.raise_for_status()
            return EngineStats.model_validate_json(response.content)
        except (httpx.HTTPError, ValueError):
            return None

    def drain(self, handle: EngineHandle, timeout_s: float) -> bool:
        """``POST /v1/drain``, then poll ``/v1/stats`` until nothing runs or waits. An engine
        without the endpoint drains on SIGTERM instead (``stop`` then waits for it)."""
        try:
            answer = self._http.post(f"{handle.url}/v1/drain")
            if answer.status_code >= 400:
                logger.info("engine %s: drain answered %d; it drains on SIGTERM instead",
                            handle.name, answer.status_code)
        except httpx.HTTPError:
            return not self.is_alive(handle)
        deadline = time.monotonic() + timeout_s
        while self.is_alive(handle):
            stats = self.stats(handle)
            if stats is None or stats.num_running + stats.num_waiting == 0:
                return True
            if time.monotonic() >= deadline:
                logger.warning("engine %s: %d request(s) still in flight after %.0f s of "
                               "draining", handle.name, stats.num_running + stats.num_waiting,
                               timeout_s)
                return False
            time.sleep(0.2)
        return True

    def stop(self, handle: EngineHandle, grace_s: float) -> int:
        return stop_process(handle.process, grace_s)
