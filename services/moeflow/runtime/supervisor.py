"""Supervision of `moeflow up`'s processes: restart what dies, give up on what cannot start.

Each supervised unit (an engine instance, the private redis-server) has a thread that starts
it, waits until it is ready, watches it, and when it dies restarts it on the same port:

- Backoff: the n-th restart in a row waits ``initial * 2**(n-1)`` seconds, at most ``max``
  (``restart_delay_s``, default 0.5 s doubling to 10 s). The count resets once the unit has
  run ``restart_backoff_reset_s`` after becoming ready.
- Give up: after ``max_start_failures`` consecutive failed starts of one unit (it exits while
  starting, or is not ready within the start timeout) the supervisor calls ``on_give_up``
  with a one-line reason; the runtime then stops everything and exits non-zero.
- Every start after the first counts as a restart (``on_restart(role)``: the
  ``moeflow_engine_restarts_total`` counter) and is logged.

Nothing here talks HTTP: an engine's gateway notices it is gone (its stats stop answering) and
back (they answer again) by itself.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from moeflow.domain.plan import TaskPlan
from moeflow.runtime.launcher import EngineHandle, EngineLauncher, EngineStartError
from moeflow.runtime.settings import SupervisionSettings
from moeflow.xccl.errors import LocalRedisError
from moeflow.xccl.redis_server import LocalRedis, start_local_redis

logger = logging.getLogger(__name__)

RESTART_BACKOFF_RESET_S = 60.0
"""A unit that ran this long after becoming ready starts its next backoff from the start."""


class StartFailed(RuntimeError):
    """A unit did not come up (the message says why, in one line)."""


class Supervised(Protocol):
    """One process the supervisor keeps running."""

    @property
    def name(self) -> str: ...

    @property
    def role(self) -> str:
        """The label of its restarts in the metrics (an engine's role, or "redis")."""
        ...

    def start(self) -> None:
        """Start it and block until it is ready; ``StartFailed`` otherwise (nothing left
        running then)."""
        ...

    def is_alive(self) -> bool: ...

    def exit_code(self) -> int | None: ...

    def stop(self, grace_s: float) -> None:
        """Stop it (idempotent; a no-op when it never started)."""
        ...


def restart_delay_s(restarts_in_a_row: int, settings: SupervisionSettings) -> float:
    """Wait before the ``restarts_in_a_row``-th restart (1 = the first): exponential."""
    exponent = max(0, restarts_in_a_row - 1)
    return min(settings.restart_backoff_max_s,
               settings.restart_backoff_initial_s * 2.0 ** min(exponent, 32))


def give_up_reason(name: str, failures: int, last_error: str) -> str:
    """The one line `moeflow up` exits with."""
    return f"{name} failed to start {failures} times in a row (last: {last_error}): giving up"


@dataclass
class EngineUnit:
    """An engine instance started through an ``EngineLauncher``, always on its task's port."""

    launcher: EngineLauncher
    task: TaskPlan
    start_timeout_s: float
    handle: EngineHandle | None = None

    @property
    def name(self) -> str:
        return f"engine {self.task.name}"

    @property
    def role(self) -> str:
        return self.task.role.value

    @property
    def url(self) -> str:
        return f"http://{self.task.host}:{self.task.port}"

    def start(self) -> None:
        self.handle = self.launcher.start(self.task)
        try:
            self.launcher.wait_ready(self.handle, self.start_timeout_s)
        except EngineStartError as exc:
            self.launcher.stop(self.handle, 0.0)  # not ready in time: nothing left behind
            raise StartFailed(exc.reason) from exc

    def is_alive(self) -> bool:
        return self.handle is not None and self.launcher.is_alive(self.handle)

    def exit_code(self) -> int | None:
        return None if self.handle is None else self.launcher.exit_code(self.handle)

    def stop(self, grace_s: float) -> None:
        if self.handle is not None:
            self.launcher.stop(self.handle, grace_s)


@dataclass
class RedisUnit:
    """The private redis-server of ``--transport redis``: same port, same folder, each start."""

    port: int
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="moeflow-redis-")))
    server: LocalRedis | None = None

    @property
    def name(self) -> str:
        return "redis-server"

    @property
    def role(self) -> str:
        return "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        try:
            self.server = start_local_redis(self.dir, port=self.port)
        except LocalRedisError as exc:
            raise StartFailed(str(exc)) from exc

    def is_alive(self) -> bool:
        return self.server is not None and self.server.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.server is None else self.server.process.poll()

    def stop(self, grace_s: float) -> None:
        if self.server is not None:
            self.server.stop(grace_s)


class Supervisor:
    """Keeps ``units`` running (one thread each) until ``stop``; see the module docstring."""

    def __init__(
        self,
        units: Sequence[Supervised],
        settings: SupervisionSettings,
        *,
        on_restart: Callable[[str], None] = lambda _role: None,
        on_give_up: Callable[[str], None] = lambda _reason: None,
    ) -> None:
        self.units = list(units)
        self._settings = settings
        self._on_restart = on_restart
        self._on_give_up = on_give_up
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._ready: set[int] = set()
        self.failure: str | None = None
        """The give-up reason, once the supervisor gave up."""
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start every unit (in parallel, each on its own thread) and keep them running."""
        for index, unit in enumerate(self.units):
            thread = threading.Thread(target=self._keep, args=(index, unit), daemon=True,
                                      name=f"supervise-{unit.name}")
            self._threads.append(thread)
            thread.start()

    def wait_ready(self) -> bool:
        """Block until every unit was ready once (True), or the supervisor gave up or was
        stopped (False)."""
        with self._changed:
            while not self._changed.wait_for(
                    lambda: len(self._ready) == len(self.units) or self.failure is not None
                    or self._stopping.is_set(), timeout=0.5):
                pass  # woken every half second: stop_restarting() does not notify
            return self.failure is None and not self._stopping.is_set()

    def stop_restarting(self) -> None:
        """From now on nothing is started again (safe to call from a signal handler)."""
        self._stopping.set()

    def stop(self) -> None:
        """Stop restarting, then stop every unit (in parallel, SIGTERM then SIGKILL)."""
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        self._stop_units(self._settings.stop_grace_s)
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._stop_units(0.0)  # one started just as we stopped: nothing may outlive us

    def _stop_units(self, grace_s: float) -> None:
        if self.units:
            with ThreadPoolExecutor(max_workers=len(self.units)) as pool:
                list(pool.map(lambda u: u.stop(grace_s), self.units))

    # -- one unit ---------------------------------------------------------------------------
    def _keep(self, index: int, unit: Supervised) -> None:
        failures = 0  # consecutive failed starts
        in_a_row = 0  # consecutive restarts (for the backoff)
        is_first = True
        while not self._stopping.is_set():
            if not is_first:
                self._on_restart(unit.role)
                logger.warning("%s: restarting (restart %d in a row)", unit.name, in_a_row)
            is_first = False
            try:
                unit.start()
            except StartFailed as exc:
                if self._stopping.is_set():
                    return
                failures += 1
                in_a_row += 1
                if failures >= self._settings.max_start_failures:
                    self._give_up(give_up_reason(unit.name, failures, str(exc)))
                    return
                delay = restart_delay_s(in_a_row, self._settings)
                logger.error("%s failed to start (%s); next try in %.1f s (%d of %d)",
                             unit.name, exc, delay, failures, self._settings.max_start_failures)
                if self._stopping.wait(delay):
                    return
                continue
            failures = 0
            ready_at = time.monotonic()
            with self._changed:
                self._ready.add(index)
                self._changed.notify_all()
            while unit.is_alive():
                if self._stopping.wait(self._settings.poll_interval_s):
                    return
            if self._stopping.is_set():
                return
            if time.monotonic() - ready_at >= RESTART_BACKOFF_RESET_S:
                in_a_row = 0
            in_a_row += 1
            delay = restart_delay_s(in_a_row, self._settings)
            logger.error("%s exited with code %s; restarting it in %.1f s", unit.name,
                         unit.exit_code(), delay)
            if self._stopping.wait(delay):
                return

    def _give_up(self, reason: str) -> None:
        with self._changed:
            if self.failure is None:
                self.failure = reason
            self._changed.notify_all()
        logger.error("%s", reason)
        self._on_give_up(reason)
