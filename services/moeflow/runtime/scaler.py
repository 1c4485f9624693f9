"""Local autoscaling for `moeflow up --min-replicas/--max-replicas/--idle-window-s`.

``LocalScaler`` runs the autoscaler policy (``moeflow.domain.autoscale``) once a second, in a
thread, against the ``/v1/stats`` of the engine processes of the colocated role, and starts or
stops processes (through an ``EngineLauncher``, the same the runtime uses) to match. It is
also the gateway's ``Discovery`` (the URLs of ready engines) and its ``ScaleUpRequester`` (a
request held at zero replicas wakes the loop at once).

- Ports: ``max_replicas`` tasks are planned up front, so an instance always comes back on the
  same URL; only the running ones are listed to the gateway.
- Last request: an engine's counters moving, or any request running, waiting, or held at the
  gateway, counts as activity; the idle window runs from the last activity.
- Scale-down drains: the engine leaves the discovery list first; once the gateway has had time
  to notice (``drain_s``) and no request waits at the gateway, the engine is asked to drain
  (``POST /v1/drain``: no new requests) and is stopped when its requests in flight are done
  (at most ``SupervisionSettings.drain_timeout_s``).
- Cold start: measured at each start (process start to ``/health``), fed to the policy.
- An engine that exits on its own is restarted on its port after the supervision backoff
  (``restart_delay_s``) and counted (``on_restart``); a restart that fails drops the slot, and
  the policy starts one again if the minimum or the load asks for it (a failing start backs off
  ``_START_BACKOFF_S``). The autoscaled platform never gives up: a model that cannot start
  answers 503 (scale from zero) instead.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moeflow.domain.autoscale import RoleObservation, ScalePolicy, decide, queue_growth_per_s
from moeflow.domain.messages import EngineStats
from moeflow.domain.plan import TaskPlan
from moeflow.runtime.launcher import EngineHandle, EngineLauncher, EngineStartError
from moeflow.runtime.settings import SupervisionSettings
from moeflow.runtime.supervisor import RESTART_BACKOFF_RESET_S, restart_delay_s

logger = logging.getLogger(__name__)

_START_BACKOFF_S = 5.0
_HELD_FRESH_S = 3.0  # the gateway re-asks every second while requests wait
SLO_WINDOW_S = 30.0
"""The TTFT/TPOT SLO is judged on the gateway's observations of the last this many seconds."""


@dataclass
class _Slot:
    task: TaskPlan
    engine: EngineHandle | None = None
    is_ready: bool = False
    last_prompt_tokens: int = -1
    restart_at: float | None = None
    """When an engine that exited on its own is due to start again."""
    restarts_in_a_row: int = 0
    ready_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.task.host}:{self.task.port}"


class LocalScaler:
    def __init__(
        self,
        launcher: EngineLauncher,
        tasks: list[TaskPlan],
        policy: ScalePolicy,
        supervision: SupervisionSettings,
        *,
        interval_s: float = 1.0,
        drain_s: float = 3.0,
        on_restart: Callable[[str], None] = lambda _role: None,
    ) -> None:
        """``tasks``: one per replica the policy may run (``max_replicas``), ports fixed."""
        self._launcher = launcher
        self._slots = [_Slot(task) for task in tasks]
        self.policy = policy
        self._supervision = supervision
        self._interval_s = interval_s
        self._drain_s = drain_s
        self._start_timeout_s = supervision.engine_start_timeout_s
        self._on_restart = on_restart
        self._lock = threading.Lock()
        self._kick = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.app: Any = None
        """The gateway app, once built: the SLO check reads its recent TTFT/TPOT."""
        now = time.monotonic()
        self._last_request = now
        self._last_scale = now
        self._last_tick = now
        self._last_waiting = 0
        self._held = (0, -math.inf)
        self._failed_at = -math.inf
        self.cold_start_s = 0.0

    # -- the gateway's Discovery and ScaleUpRequester -------------------------------------------
    async def ready_urls(self) -> list[str]:
        with self._lock:
            return [s.url for s in self._slots if s.is_ready]

    def close(self) -> None:
        return None

    @property
    def ready_engine_urls(self) -> list[str]:
        with self._lock:
            return [s.url for s in self._slots if s.is_ready]

    def request_scale_up(self, model: str, num_waiting: int) -> None:
        logger.debug("%d request(s) for %s wait for a replica", num_waiting, model)
        with self._lock:
            self._held = (num_waiting, time.monotonic())
        self._kick.set()

    # -- life cycle ------------------------------------------------------------------------
    def start_initial(self, count: int) -> bool:
        """Start ``count`` engines and wait for them (before the gateway starts); False if
        one failed."""
        return self._scale_up(count)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="moeflow-scaler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop deciding; no engine starts after this returns (the runtime stops the rest)."""
        with self._lock:
            self._stopping.set()
        self._kick.set()

    def stop_restarting(self) -> None:
        """Start nothing from now on (safe in a signal handler: takes no lock the event loop
        may hold)."""
        self._stopping.set()

    def join(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def stop_engines(self) -> None:
        """Stop every engine (after ``stop``): SIGTERM, SIGKILL after the grace period."""
        with self._lock:
            handles = [s.engine for s in self._slots if s.engine is not None]
        grace_s = self._supervision.stop_grace_s
        threads = [threading.Thread(target=self._launcher.stop, args=(h, grace_s))
                   for h in handles]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._kick.wait(self._interval_s)
            self._kick.clear()
            if self._stopping.is_set():
                return
            try:
                self.tick()
            except Exception:
                logger.exception("autoscaler tick failed")

    # -- one decision ----------------------------------------------------------------------
    def _stats(self, slot: _Slot) -> EngineStats | None:
        return None if slot.engine is None else self._launcher.stats(slot.engine)

    def tick(self) -> None:
        self._reap()
        self._restart_due()
        now = time.monotonic()
        held, held_at = self._held
        held = held if now - held_at < _HELD_FRESH_S else 0
        stats: list[EngineStats] = []
        is_active = held > 0
        num_unobserved = 0
        for slot in self._slots:
            if not slot.is_ready:
                continue
            if (s := self._stats(slot)) is None:
                num_unobserved += 1  # silence is not idleness
                is_active = True
                continue
            stats.append(s)
            counted = slot.last_prompt_tokens
            is_active |= counted >= 0 and s.num_prompt_tokens_total != counted
            is_active |= s.num_running + s.num_waiting > 0
            slot.last_prompt_tokens = s.num_prompt_tokens_total
        if is_active:
            self._last_request = now
        waiting = sum(s.num_waiting for s in stats) + held
        growth = queue_growth_per_s(self._last_waiting, waiting, now - self._last_tick)
        self._last_waiting, self._last_tick = waiting, now
        current = sum(1 for s in self._slots if s.engine is not None or s.restart_at is not None)
        ttft_ms, tpot_ms = self._recent_latencies()
        decision = decide(RoleObservation(
            current_replicas=current, stats=stats, num_held_at_gateway=held,
            ttft_ms=ttft_ms, tpot_ms=tpot_ms,
            waiting_growth_per_s=growth, cold_start_s=self.cold_start_s,
            seconds_since_last_request=now - self._last_request,
            seconds_since_last_scale=now - self._last_scale,
            num_unobserved=num_unobserved,
        ), self.policy)
        if decision.desired_replicas > current and now - self._failed_at >= _START_BACKOFF_S:
            logger.info("autoscaler: %d -> %d (%s)", current, decision.desired_replicas,
                        decision.reason)
            self._scale_up(decision.desired_replicas - current)
        elif decision.desired_replicas < current:
            logger.info("autoscaler: %d -> %d (%s)", current, decision.desired_replicas,
                        decision.reason)
            self._scale_down(current - decision.desired_replicas)

    def _recent_latencies(self) -> tuple[list[float], list[float]]:
        """TTFT/TPOT (ms) the gateway measured in the last SLO window, once it runs."""
        service = getattr(getattr(self.app, "state", None), "service", None)
        if service is None:
            return [], []
        ttft_ms, tpot_ms = service.metrics.recent.window(SLO_WINDOW_S)
        return ttft_ms, tpot_ms

    def _reap(self) -> None:
        """Engines that exited on their own: due for a restart on their port (backoff)."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.engine is None or self._launcher.is_alive(slot.engine):
                continue
            if now - slot.ready_at >= RESTART_BACKOFF_RESET_S:
                slot.restarts_in_a_row = 0
            slot.restarts_in_a_row += 1
            delay = restart_delay_s(slot.restarts_in_a_row, self._supervision)
            logger.error("engine %s exited with code %s; restarting it in %.1f s",
                         slot.task.name, self._launcher.exit_code(slot.engine), delay)
            with self._lock:
                slot.is_ready = False
                self._forget(slot)
                slot.restart_at = now + delay

    def _restart_due(self) -> None:
        due = [s for s in self._slots if s.restart_at is not None
               and s.restart_at <= time.monotonic()]
        for slot in due:
            slot.restart_at = None
            self._on_restart(slot.task.role.value)
            logger.warning("engine %s: restarting (restart %d in a row)", slot.task.name,
                           slot.restarts_in_a_row)
        if due:
            self._start_slots(due)

    def _forget(self, slot: _Slot) -> None:
        slot.engine = None
        slot.last_prompt_tokens = -1

    def _scale_up(self, count: int) -> bool:
        """Start ``count`` engines (lowest ranks first) and wait until they answer."""
        free = [s for s in self._slots if s.engine is None and s.restart_at is None]
        return self._start_slots(free[:count])

    def _start_slots(self, slots: list[_Slot]) -> bool:
        started: list[_Slot] = []
        for slot in slots:
            with self._lock:
                if self._stopping.is_set():
                    break
                slot.engine = self._launcher.start(slot.task)
            started.append(slot)
        is_ok = bool(started)
        for slot in started:
            assert slot.engine is not None
            try:
                self._launcher.wait_ready(slot.engine, self._start_timeout_s)
            except EngineStartError as exc:
                if not self._stopping.is_set():
                    logger.error("autoscaler: %s", exc)
                self._stop_process(slot, grace_s=0.0)
                slot.restarts_in_a_row = 0
                self._failed_at = time.monotonic()
                is_ok = False
                continue
            now = time.monotonic()
            self.cold_start_s = now - slot.engine.started_at
            logger.info("engine %s ready after a %.1f s cold start", slot.task.name,
                        self.cold_start_s)
            with self._lock:
                slot.is_ready = True
                slot.ready_at = now
        self._last_scale = self._last_request = time.monotonic()
        return is_ok

    def _scale_down(self, count: int) -> None:
        """Drain and stop ``count`` ready engines, highest ranks first."""
        victims = [s for s in reversed(self._slots) if s.is_ready][:count]
        with self._lock:
            for slot in victims:
                slot.is_ready = False  # leaves the gateway's discovery list
        if self._stopping.wait(self._drain_s):
            return
        for slot in victims:
            if time.monotonic() - self._held[1] < _HELD_FRESH_S:
                # requests wait at the gateway for a replica: keep this one for them
                logger.info("autoscaler: requests wait; keeping %s", slot.task.name)
                with self._lock:
                    slot.is_ready = True
                self._last_request = time.monotonic()
                continue
            if slot.engine is not None:  # no new requests; those in flight finish first
                self._launcher.drain(slot.engine, self._supervision.drain_timeout_s)
            self._stop_process(slot)
            logger.info("autoscaler: stopped engine %s", slot.task.name)
        self._last_scale = time.monotonic()

    def _stop_process(self, slot: _Slot, grace_s: float | None = None) -> None:
        """Stop the slot's engine. The default grace covers an engine that drains on
        SIGTERM (one without ``/v1/drain``)."""
        if slot.engine is None:
            return
        if grace_s is None:
            grace_s = max(self._supervision.stop_grace_s,
                          self._supervision.drain_timeout_s + 1.0)
        self._launcher.stop(slot.engine, grace_s)
        with self._lock:
            self._forget(slot)
