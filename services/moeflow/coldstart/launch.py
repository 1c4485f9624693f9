"""Bring one engine instance up, timing the five steps: the one entry every path shares.

``moeflow engine`` (cold process), a claimed warm-pool worker and a forked child all end in
``serve_engine``: load (unless the weights came with the caller), build the engine, warm it up,
then serve HTTP and mark ready once the sockets listen. A forked child brings an engine its
parent already built and warmed up (``engine=``), so it only builds the app and listens.

``prewarm_http`` pays the HTTP stack's first-call costs (FastAPI/pydantic route and schema
set-up, uvicorn's protocol imports) in a process that will later serve: the warm-pool worker
before its claim, the fork server before it forks.

How a serving instance ends (``ReadyServer``, docs/operations.md "Engine instances"):

- SIGTERM drains: admission stops (new requests 503, readiness 503 "draining") while the
  listening socket stays open; the process exits 0 once no request is in flight, or after
  ``drain_timeout_s``, when the remaining requests get a ``backend_unavailable`` error first.
  A second SIGTERM, or SIGINT, shuts down at once (uvicorn's graceful shutdown).
- The engine loop dies (``AsyncEngine.is_loop_alive`` False): the cause is logged and the
  process exits 1, so a supervisor (kubelet, ``moeflow up``) restarts it.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, SimpleNamespace
from typing import cast

import uvicorn
from fastapi import FastAPI

from moeflow.coldstart.preload import preload, store_from
from moeflow.domain.coldstart import ColdStartRecord
from moeflow.domain.errors import BackendUnavailableError
from moeflow.domain.messages import GenerateRequest, SamplingParams
from moeflow.engine.async_engine import SHUTTING_DOWN, AsyncEngine
from moeflow.engine.coldstart_routes import ColdStartMetrics
from moeflow.engine.config import EngineSettings
from moeflow.engine.kernels.openmp import release_pool
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.preloaded import Preloaded
from moeflow.engine.server import build_engine_app

logger = logging.getLogger(__name__)


EXIT_LOOP_DEAD = 1
_CUT_GRACE_S = 2.0
"""After a drain timed out: how long the failed requests get to end their streams."""
_SHUTDOWN_GRACE_S = 5
"""Longest uvicorn waits for connections after a drain or a dead loop."""


class ReadyServer(uvicorn.Server):
    """uvicorn, marking the instance ready as soon as it listens; drains on SIGTERM and exits
    non-zero when the engine loop dies (see the module doc). ``exit_code`` is what to return."""

    def __init__(self, config: uvicorn.Config, metrics: ColdStartMetrics,
                 on_ready: ReadyCallback | None = None, *,
                 async_engine: AsyncEngine | None = None, drain_timeout_s: float = 30.0) -> None:
        super().__init__(config)
        self._metrics = metrics
        self._on_ready = on_ready
        self._engine = async_engine
        self._drain_timeout_s = drain_timeout_s
        self._drain_deadline: float | None = None
        self._cut_deadline: float | None = None
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The first SIGTERM starts a drain; anything else is uvicorn's own handling."""
        if (sig == signal.SIGTERM and self._engine is not None and self._drain_deadline is None
                and not self.should_exit):
            self._engine.drain()  # sets a flag: safe in a signal handler
            self._drain_deadline = time.monotonic() + self._drain_timeout_s
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        engine = self._engine
        if engine is None or not engine.is_started:
            return False
        if not engine.is_loop_alive:
            logger.critical("the engine loop is dead (%r): exiting with code %d so that the "
                            "instance is restarted", engine.fatal_error, EXIT_LOOP_DEAD)
            self.exit_code = EXIT_LOOP_DEAD
            self.config.timeout_graceful_shutdown = _SHUTDOWN_GRACE_S
            return True
        if self._drain_deadline is None:
            return False
        now = time.monotonic()
        if engine.num_in_flight == 0:
            logger.info("drained: no request in flight; exiting")
            self.config.timeout_graceful_shutdown = _SHUTDOWN_GRACE_S
            return True
        if self._cut_deadline is None and now >= self._drain_deadline:
            logger.warning("drain timeout (%.0f s): failing %d requests still in flight",
                           self._drain_timeout_s, engine.num_in_flight)
            engine.fail_all(BackendUnavailableError(SHUTTING_DOWN))
            self._cut_deadline = now + _CUT_GRACE_S
        if self._cut_deadline is not None and now >= self._cut_deadline:
            self.config.timeout_graceful_shutdown = _SHUTDOWN_GRACE_S
            return True
        return False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._metrics.observe_ready()
            if self._on_ready is not None:
                self._on_ready(self._metrics.record)
            logger.info("cold start: %s", self._metrics.record.as_dict())


ReadyCallback = Callable[[ColdStartRecord], None]
"""Called once, on the event loop, right after ready is marked (keep it short)."""


def warm_up(engine: LLMEngine) -> None:
    """One two-token greedy request, so the first routed request pays no first-call costs."""
    request = GenerateRequest(
        request_id="coldstart-warmup", prompt_token_ids=(1, 2, 3),
        sampling=SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
    )
    engine.add_request(request)
    while engine.has_work:
        engine.step()
    engine.num_prefix_hit_tokens = 0
    engine.num_prompt_tokens_total = 0


def build_engine(settings: EngineSettings, record: ColdStartRecord,
                 preloaded: Preloaded | None = None) -> LLMEngine:
    record.mark_load_started()
    if preloaded is None and settings.role.runs_whole_model:
        preloaded = preload(settings, store_from(settings.model_store))
    if preloaded is not None and record.weights_source == "checkpoint":
        record.weights_source = preloaded.weights_source
    engine = LLMEngine(settings, preloaded=preloaded, cold_start=record)
    if settings.warmup and settings.role.runs_whole_model:
        warm_up(engine)
    # this thread computes no more (the engine's loop thread does): its OpenMP workers would
    # make libgomp throttle the loop thread's team (kernels/openmp.py)
    release_pool()
    return engine


def uvicorn_config(app: object, settings: EngineSettings) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port,  # type: ignore[arg-type]
                          log_level="warning")


def prewarm_http(engine: LLMEngine | None = None) -> None:
    """Build a throwaway engine app and load a uvicorn config for it, so that the real ones
    built later in this process (or in its forked children) skip the first-call costs.

    Without an engine (warm-pool worker, no model yet) a stand-in with the attributes
    ``build_engine_app`` reads at build time is used; nothing of it is ever served.
    """
    if engine is None:
        settings = EngineSettings.model_construct(model_path=Path("/"))
        stand_in = SimpleNamespace(settings=settings, cold_start=ColdStartRecord(0.0),
                                   runner=None, stats=_no_stats, adapters=None)
        engine = cast(LLMEngine, stand_in)
    app = build_engine_app(engine)
    uvicorn_config(app, engine.settings).load()


def _no_stats() -> None:
    raise RuntimeError("a pre-warm app is never scraped: it has no engine")


def serve_engine(settings: EngineSettings, record: ColdStartRecord,
                 preloaded: Preloaded | None = None, *, engine: LLMEngine | None = None,
                 on_ready: ReadyCallback | None = None,
                 sockets: list[socket.socket] | None = None,
                 customize: Callable[[FastAPI], None] | None = None) -> int:
    """Build (unless ``engine`` is given) and serve until stopped; the exit code: 0 after
    SIGINT, or after SIGTERM and a drain; ``EXIT_LOOP_DEAD`` when the engine loop died.
    ``on_ready`` is told once the sockets listen. ``sockets``: already listening ones to serve
    on (a claimed warm worker's), instead of binding ``settings.host:port``; ``customize`` may
    add routes to the app before it serves."""
    if engine is None:
        engine = build_engine(settings, record, preloaded)
    app = build_engine_app(engine)
    if customize is not None:
        customize(app)
    config = uvicorn_config(app, settings)
    server = ReadyServer(config, app.state.coldstart_metrics, on_ready,
                         async_engine=app.state.async_engine,
                         drain_timeout_s=settings.drain_timeout_s)
    server.run(sockets=sockets)
    return server.exit_code
