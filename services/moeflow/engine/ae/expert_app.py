"""HTTP face of an expert instance: health, stats, live load/unload of experts, metrics.

The data path is XCCL (``ExpertWorker``); HTTP is control only. ``GET /v1/model_info`` reports
role "expert" so that a gateway that discovers every Task of a Model knows not to send it
requests. Errors map to the OpenAI envelope through ``moeflow.web.errors``.

Health as on engine instances (``moeflow.engine.health``): ``/health/live`` follows the
worker's serving threads (one per attention peer), ``/health/ready`` and ``/health`` also its
XCCL transport. With an internal token (``EngineSettings.internal_token``) every other route
needs it (the balancer sends it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from moeflow.domain.errors import InvalidRequestError
from moeflow.domain.messages import ExpertInstanceStats, ExpertLoadRequest
from moeflow.domain.roles import Role
from moeflow.engine.ae.exchange import open_exchange
from moeflow.engine.ae.expert_client import expert_rank
from moeflow.engine.ae.expert_map import round_robin_hosted
from moeflow.engine.ae.expert_worker import ExpertWorker, checkpoint_loader
from moeflow.engine.config import EngineSettings
from moeflow.engine.health import TransportState, add_health_routes, probe_transport
from moeflow.engine.kernels.openmp import release_pool, then_release
from moeflow.engine.model_runner import DTYPES
from moeflow.engine.models.arch import load_arch
from moeflow.web.errors import install_error_handlers
from moeflow.web.internal_auth import InternalTokenMiddleware
from moeflow.xccl import Transport, make_transport

logger = logging.getLogger(__name__)


class _Metrics(Collector):
    def __init__(self, worker: ExpertWorker) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        s = self._worker.stats()
        tokens = CounterMetricFamily("moeflow_expert_tokens", "Pairs computed per expert",
                                     labels=["engine", "expert"])
        for expert, count in enumerate(s.tokens_per_expert):
            tokens.add_metric([s.rank, str(expert)], count)
        hosted = GaugeMetricFamily("moeflow_expert_hosted", "Experts hosted here",
                                   labels=["engine"])
        hosted.add_metric([s.rank], len(s.hosted))
        yield from (tokens, hosted)


def build_expert_worker(settings: EngineSettings,
                        transport: Transport | None = None) -> ExpertWorker:
    """The worker of this instance; ``transport``: its XCCL endpoint (default: opened here)."""
    arch = load_arch(settings.model_path)
    if not arch.is_moe:
        raise ValueError(f"role expert needs a MoE model; {arch.model_type} is dense")
    if settings.num_expert_instances > arch.num_experts:
        raise ValueError(f"{settings.num_expert_instances} expert instances for "
                         f"{arch.num_experts} experts: some would host nothing")
    rank = expert_rank(settings.rank)
    if transport is None:
        transport = make_transport(settings.transport, settings.xccl_group, rank,
                                   redis_url=settings.redis_url,
                                   redis_password=settings.redis_password_value)
    initial = round_robin_hosted(arch.num_experts, settings.num_expert_instances)[settings.rank]
    peers = [f"attention-{i}" for i in range(settings.num_attention_instances)]
    loader = checkpoint_loader(settings.model_path, arch, DTYPES[settings.dtype])
    exchange = open_exchange(transport, settings.transport, settings.ae_spin_us, peers)
    return ExpertWorker(transport, rank, peers, arch.num_experts, initial, loader,
                        timeout_s=settings.expert_timeout_s, exchange=exchange)


def build_expert_app(settings: EngineSettings) -> FastAPI:
    torch.set_num_threads(settings.num_threads or 1)
    started = time.perf_counter()
    transport = make_transport(settings.transport, settings.xccl_group,
                               expert_rank(settings.rank), redis_url=settings.redis_url,
                               redis_password=settings.redis_password_value)
    worker = build_expert_worker(settings, transport)
    # the loads above may have opened parallel regions on this thread; only the compute
    # threads may keep OpenMP workers, or libgomp throttles every team's spin-wait
    release_pool()
    logger.info("%s ready: experts %s loaded in %.2f s", worker.rank, sorted(worker.hosted),
                time.perf_counter() - started)
    registry = CollectorRegistry()
    registry.register(_Metrics(worker))
    created_unix = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="moeflow expert instance", lifespan=lifespan)
    app.state.expert_worker = worker
    app.state.transport = transport
    app.add_middleware(InternalTokenMiddleware, token=settings.internal_token_value)

    install_error_handlers(app)

    async def change(body: ExpertLoadRequest, unload: bool) -> ExpertInstanceStats:
        try:
            if unload:
                worker.unload(body.experts)
            else:  # reading weights takes a while: keep the event loop free
                await asyncio.to_thread(then_release(worker.load), body.experts)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="experts") from exc
        return worker.stats()

    @app.post("/v1/experts/load")
    async def load(body: ExpertLoadRequest) -> ExpertInstanceStats:
        return await change(body, unload=False)

    @app.post("/v1/experts/unload")
    async def unload(body: ExpertLoadRequest) -> ExpertInstanceStats:
        return await change(body, unload=True)

    @app.get("/v1/experts/stats")
    async def stats() -> ExpertInstanceStats:
        return worker.stats()

    @app.get("/v1/model_info")
    async def model_info() -> JSONResponse:
        return JSONResponse({"served_model_name": settings.name, "role": "expert",
                             "xccl_rank": worker.rank, "created_unix": created_unix})

    async def transport_state() -> TransportState:
        return await probe_transport(transport)

    add_health_routes(app, is_loop_alive=lambda: worker.is_healthy, is_draining=lambda: False,
                      transport_state=transport_state, extra={"role": Role.EXPERT})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
