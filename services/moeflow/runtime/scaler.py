"""Local autoscaling for `moeflow up --min-replicas/--max-replicas/--idle-window-s`.

``LocalScaler`` runs the autoscaler policy (``moeflow.domain.autoscale``) once a second, in a
thread, against the ``/v1/stats`` of the engine processes of the colocated role, and starts or
stops processes (through the runtime's own ``_start_engine``/``_wait_ready``) to match. It is
also the gateway's ``Discovery`` (the URLs of ready engines) and its ``ScaleUpRequester`` (a
request held at zero replicas wakes the loop at once).

- Ports: ``max_replicas`` tasks are planned up front, so an instance always comes back on the
  same URL; only the running ones are listed to the gateway.
- Last request: an engine's counters moving, or any request running, waiting, or held at the
  gateway, counts as activity; the idle window runs from the last activity.
- Scale-down drains: the engine leaves the discovery list first, and is stopped only if it is
  still idle after the gateway has had time to notice (``drain_s``) and nothing waits.
- Cold start: measured at each start (process start to ``/health``), fed to the policy.
- An engine that exits on its own is dropped; the policy restarts one if the minimum or the
  load asks for it (a failing start backs off ``_START_BACKOFF_S``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from moeflow.domain.autoscale import RoleObservation, ScalePolicy, decide, queue_growth_per_s
from moeflow.domain.messages import EngineStats
from moeflow.domain.plan import TaskPlan

if TYPE_CHECKING:
    from moeflow.runtime.local import EngineProcess, LocalRuntime

logger = logging.getLogger(__name__)

_START_BACKOFF_S = 5.0
_STOP_GRACE_S = 10.0
_HELD_FRESH_S = 3.0  # the gateway re-asks every second while requests wait
SLO_WINDOW_S = 30.0
"""The TTFT/TPOT SLO is judged on the gateway's observations of the last this many seconds."""


def autoscaling_requested(args: argparse.Namespace) -> bool:
    return any(getattr(args, name, None) is not None
               for name in ("min_replicas", "max_replicas", "idle_window_s"))


def policy_from_args(args: argparse.Namespace) -> ScalePolicy:
    """Unset flags: at least one replica, at most ``--instances``, idle after 300 s."""
    low = 1 if args.min_replicas is None else args.min_replicas
    high = max(args.instances, low, 1) if args.max_replicas is None else args.max_replicas
    idle = 300.0 if args.idle_window_s is None else args.idle_window_s
    return ScalePolicy(min_replicas=low, max_replicas=high, idle_window_s=idle,
                       scale_up_cooldown_s=5.0, scale_down_cooldown_s=max(30.0, idle),
                       slo_ttft_ms=getattr(args, "slo_ttft_ms", None),
                       slo_tpot_ms=getattr(args, "slo_tpot_ms", None))


@dataclass
class _Slot:
    task: TaskPlan
    engine: EngineProcess | None = None
    is_ready: bool = False
    last_prompt_tokens: int = -1

    @property
    def url(self) -> str:
        return f"http://{self.task.host}:{self.task.port}"


class LocalScaler:
    def __init__(
        self,
        runtime: LocalRuntime,
        tasks: list[TaskPlan],
        policy: ScalePolicy,
        *,
        interval_s: float = 1.0,
        drain_s: float = 3.0,
        start_timeout_s: float = 300.0,
    ) -> None:
        self._runtime = runtime
        self._slots = [_Slot(task) for task in tasks]
        self.policy = policy
        self._interval_s = interval_s
        self._drain_s = drain_s
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._kick = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._http = httpx.Client(timeout=2.0)
        self.app: object | None = None
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

    def request_scale_up(self, model: str, num_waiting: int) -> None:
        logger.debug("%d request(s) for %s wait for a replica", num_waiting, model)
        with self._lock:
            self._held = (num_waiting, time.monotonic())
        self._kick.set()

    # -- life cycle ------------------------------------------------------------------------
    def start_initial(self, count: int) -> None:
        """Start ``count`` engines and wait for them (before the gateway starts)."""
        if not self._scale_up(count):
            raise RuntimeError("the initial engine(s) failed to start")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="moeflow-scaler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop deciding; no engine starts after this returns (the runtime stops the rest)."""
        with self._lock:
            self._stopping.set()
        self._kick.set()

    def join(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._http.close()

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
        try:
            response = self._http.get(f"{slot.url}/v1/stats")
            response.raise_for_status()
            return EngineStats.model_validate_json(response.content)
        except (httpx.HTTPError, ValueError):
            return None

    def tick(self) -> None:
        self._reap()
        now = time.monotonic()
        held, held_at = self._held
        held = held if now - held_at < _HELD_FRESH_S else 0
        stats: list[EngineStats] = []
        is_active = held > 0
        for slot in self._slots:
            if not slot.is_ready or (s := self._stats(slot)) is None:
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
        current = sum(1 for s in self._slots if s.engine is not None)
        ttft_ms, tpot_ms = self._recent_latencies()
        decision = decide(RoleObservation(
            current_replicas=current, stats=stats, num_held_at_gateway=held,
            ttft_ms=ttft_ms, tpot_ms=tpot_ms,
            waiting_growth_per_s=growth, cold_start_s=self.cold_start_s,
            seconds_since_last_request=now - self._last_request,
            seconds_since_last_scale=now - self._last_scale,
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
        for slot in self._slots:
            if slot.engine is not None and slot.engine.process.poll() is not None:
                logger.error("engine %s exited with code %s", slot.engine.name,
                             slot.engine.process.returncode)
                with self._lock:
                    slot.is_ready = False
                self._forget(slot)

    def _forget(self, slot: _Slot) -> None:
        # runtime.engines keeps exited engines (append-only: the runtime's stop needs no lock)
        slot.engine = None
        slot.last_prompt_tokens = -1

    def _scale_up(self, count: int) -> bool:
        """Start ``count`` engines (lowest ranks first) and wait until they answer."""
        started: list[tuple[_Slot, float]] = []
        for slot in [s for s in self._slots if s.engine is None][:count]:
            with self._lock:
                if self._stopping.is_set():
                    break
                slot.engine = self._runtime._start_engine(slot.task)
                self._runtime.engines.append(slot.engine)
            started.append((slot, time.monotonic()))
        is_ok = bool(started)
        for slot, began in started:
            assert slot.engine is not None
            try:
                self._runtime._wait_ready(slot.engine, self._start_timeout_s)
            except RuntimeError as exc:
                if not self._stopping.is_set():
                    logger.error("autoscaler: %s", exc)
                self._stop_process(slot)
                self._failed_at = time.monotonic()
                is_ok = False
                continue
            self.cold_start_s = time.monotonic() - began
            logger.info("engine %s ready after a %.1f s cold start", slot.task.name,
                        self.cold_start_s)
            with self._lock:
                slot.is_ready = True
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
            stats = self._stats(slot)  # None: not answering, so nothing to lose
            is_busy = stats is not None and stats.num_running + stats.num_waiting > 0
            if is_busy or time.monotonic() - self._held[1] < _HELD_FRESH_S:
                logger.info("autoscaler: %s got work while draining; keeping it", slot.task.name)
                with self._lock:
                    slot.is_ready = True
                self._last_request = time.monotonic()
                continue
            self._stop_process(slot)
            logger.info("autoscaler: stopped engine %s", slot.task.name)
        self._last_scale = time.monotonic()

    def _stop_process(self, slot: _Slot) -> None:
        if slot.engine is None:
            return
        process = slot.engine.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._forget(slot)


def serve_autoscaled(runtime: LocalRuntime, model_path: Path, served_name: str) -> int:
    """`moeflow up` with autoscaling: the scaler owns the engines, the gateway follows it."""
    import uvicorn

    from moeflow.cli import _gateway_settings
    from moeflow.gateway.app import build_app
    from moeflow.gateway.settings import GatewaySettings

    args = runtime.args
    if args.mode != "colocated":
        raise RuntimeError("autoscaling (--min/--max-replicas, --idle-window-s) supports "
                           "--mode colocated only for now")
    policy = policy_from_args(args)
    wide = copy.copy(runtime)  # plan every replica the scaler may start: fixed ports, fixed URLs
    wide.args = argparse.Namespace(**{**vars(args), "instances": policy.max_replicas})
    plan = wide.plan(model_path, served_name)
    tasks = [task for job in plan.jobs for task in job.tasks]
    settings = _gateway_settings(args, [])
    assert isinstance(settings, GatewaySettings)
    scaler = LocalScaler(runtime, tasks, policy, drain_s=settings.discovery_interval_s + 1.0)
    # the first start teaches the gateway the model (tokenizer, context), even with min 0
    scaler.start_initial(min(max(args.instances, policy.min_replicas, 1), policy.max_replicas))
    settings = settings.model_copy(update={"engine_urls": tuple(
        e.url for e in runtime.engines)})
    app = build_app(settings, discovery=scaler, scale_up=scaler)
    scaler.app = app  # the SLO check reads the gateway's recent TTFT/TPOT
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="info",
    ))
    runtime._server = server
    scaler.start()
    logger.info("serving %s at http://%s:%d/v1 with %d..%d replicas (idle window %s s)",
                served_name, settings.host, settings.port, policy.min_replicas,
                policy.max_replicas, policy.idle_window_s)
    try:
        server.run()
    except KeyboardInterrupt:
        logger.info("stopping on Ctrl-C")
    finally:
        scaler.stop()
        with contextlib.suppress(Exception):
            runtime.stop_engines()
        scaler.join()
    return 0
