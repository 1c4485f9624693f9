"""Bring one engine instance up, timing the five steps: the one entry every path shares.

``moeflow engine`` (cold process), a claimed warm-pool worker and a forked child all end in
``serve_engine``: load (unless the weights came with the caller), build the engine, warm it up,
then serve HTTP and mark ready once the sockets listen. A forked child brings an engine its
parent already built and warmed up (``engine=``), so it only builds the app and listens.

``prewarm_http`` pays the HTTP stack's first-call costs (FastAPI/pydantic route and schema
set-up, uvicorn's protocol imports) in a process that will later serve: the warm-pool worker
before its claim, the fork server before it forks.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import uvicorn
from fastapi import FastAPI

from moeflow.coldstart.preload import preload, store_from
from moeflow.domain.coldstart import ColdStartRecord
from moeflow.domain.messages import GenerateRequest, SamplingParams
from moeflow.engine.coldstart_routes import ColdStartMetrics
from moeflow.engine.config import EngineSettings
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.preloaded import Preloaded
from moeflow.engine.server import build_engine_app

logger = logging.getLogger(__name__)


class ReadyServer(uvicorn.Server):
    """uvicorn, marking the instance ready as soon as it listens."""

    def __init__(self, config: uvicorn.Config, metrics: ColdStartMetrics,
                 on_ready: ReadyCallback | None = None) -> None:
        super().__init__(config)
        self._metrics = metrics
        self._on_ready = on_ready

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
                                   runner=None)
        engine = cast(LLMEngine, stand_in)
    app = build_engine_app(engine)
    uvicorn_config(app, engine.settings).load()


def serve_engine(settings: EngineSettings, record: ColdStartRecord,
                 preloaded: Preloaded | None = None, *, engine: LLMEngine | None = None,
                 on_ready: ReadyCallback | None = None,
                 sockets: list[socket.socket] | None = None,
                 customize: Callable[[FastAPI], None] | None = None) -> int:
    """Build (unless ``engine`` is given) and serve until stopped (SIGINT/SIGTERM); the exit
    code. ``on_ready`` is told once the sockets listen. ``sockets``: already listening ones
    to serve on (a claimed warm worker's), instead of binding ``settings.host:port``;
    ``customize`` may add routes to the app before it serves."""
    if engine is None:
        engine = build_engine(settings, record, preloaded)
    app = build_engine_app(engine)
    if customize is not None:
        customize(app)
    config = uvicorn_config(app, settings)
    ReadyServer(config, app.state.coldstart_metrics, on_ready).run(sockets=sockets)
    return 0
