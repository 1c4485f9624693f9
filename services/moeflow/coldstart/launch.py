"""Bring one engine instance up, timing the five steps: the one entry every path shares.

``moeflow engine`` (cold process), a claimed warm-pool worker and a forked child all end in
``serve_engine``: load (unless the weights came with the caller), build the engine, warm it up,
then serve HTTP and mark ready once the sockets listen.
"""

from __future__ import annotations

import logging
import socket

import uvicorn

from moeflow.coldstart.http import ColdStartMetrics
from moeflow.coldstart.preload import Preloaded, preload, store_from
from moeflow.coldstart.record import ColdStartRecord
from moeflow.common.messages import GenerateRequest, SamplingParams
from moeflow.engine.config import EngineSettings
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.server import build_engine_app

logger = logging.getLogger(__name__)


class ReadyServer(uvicorn.Server):
    """uvicorn, marking the instance ready as soon as it listens."""

    def __init__(self, config: uvicorn.Config, metrics: ColdStartMetrics) -> None:
        super().__init__(config)
        self._metrics = metrics

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._metrics.observe_ready()
            logger.info("cold start: %s", self._metrics.record.as_dict())


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
    if preloaded is None and settings.role in ("colocated", "prefill", "decode"):
        preloaded = preload(settings, store_from(settings.model_store))
    if preloaded is not None and record.weights_source == "checkpoint":
        record.weights_source = preloaded.weights_source
    engine = LLMEngine(settings, preloaded=preloaded, cold_start=record)
    if settings.warmup and settings.role in ("colocated", "prefill", "decode"):
        warm_up(engine)
    return engine


def serve_engine(settings: EngineSettings, record: ColdStartRecord,
                 preloaded: Preloaded | None = None) -> int:
    """Build and serve until stopped (SIGINT/SIGTERM); the exit code."""
    engine = build_engine(settings, record, preloaded)
    app = build_engine_app(engine)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning")
    ReadyServer(config, app.state.coldstart_metrics).run()
    return 0
