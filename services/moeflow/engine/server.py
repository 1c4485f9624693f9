"""HTTP face of one engine instance: generate (NDJSON stream), model info, stats, health, drain.

Errors become responses through ``moeflow.web.errors``, as in the gateway. The body of
``POST /v1/generate`` is a ``GenerateRequest``; the response streams one JSON ``TokenChunk``
per line, or an ``ErrorChunk`` if the request fails after the stream began. Closing the
connection aborts the request and frees its KV blocks.

Health (``moeflow.engine.health``): ``/health/live`` follows the engine loop thread,
``/health/ready`` (and ``/health``) also the XCCL transport and draining; ``/v1/stats`` carries
the same three facts. ``POST /v1/drain`` stops admission (new requests get 503
``backend_unavailable``) while requests in flight finish. With an internal token
(``EngineSettings.internal_token``) every route but health and metrics needs it
(``moeflow.web.internal_auth``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import cast

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from moeflow.domain.errors import BackendUnavailableError, InvalidRequestError, MoeflowError
from moeflow.domain.messages import (
    EngineStats,
    ErrorChunk,
    GenerateRequest,
    ModelInfo,
    PrefillRequest,
    PrefillResponse,
    TokenChunk,
)
from moeflow.domain.roles import Role
from moeflow.engine.adapter_routes import add_adapter_routes
from moeflow.engine.ae.attention_routes import add_attention_routes
from moeflow.engine.ae.attention_runner import AttentionRunner
from moeflow.engine.async_engine import AsyncEngine, KVPullReady
from moeflow.engine.coldstart_routes import add_coldstart_routes
from moeflow.engine.disagg import KVPuller, prefill_only
from moeflow.engine.health import TransportState, add_health_routes, probe_transport
from moeflow.engine.kv_transfer import LayerwiseKVSender
from moeflow.engine.llm_engine import STEP_FAILED_MESSAGE, LLMEngine
from moeflow.engine.metrics import add_model_server_metrics
from moeflow.web.errors import install_error_handlers
from moeflow.web.internal_auth import InternalTokenMiddleware
from moeflow.xccl import Transport, make_transport

logger = logging.getLogger(__name__)


def _metrics(engine: LLMEngine) -> CollectorRegistry:
    registry = CollectorRegistry()
    labels = {"engine": engine.settings.instance_name, "role": engine.settings.role}

    def gauge(name: str, doc: str, fn: object) -> None:
        g = Gauge(name, doc, list(labels), registry=registry)
        g.labels(**labels).set_function(fn)  # type: ignore[arg-type]

    gauge("moeflow_engine_waiting_requests", "Requests queued", lambda: engine.stats().num_waiting)
    gauge("moeflow_engine_running_requests", "Requests running", lambda: engine.stats().num_running)
    gauge("moeflow_engine_kv_cache_usage_ratio", "Share of KV blocks in use",
          lambda: engine.stats().kv_usage_ratio)
    return registry


class _HealthCollector(Collector):
    """Loop liveness, draining, the last transport check, and failure counters."""

    def __init__(self, async_engine: AsyncEngine, state: dict[str, object],
                 labels: dict[str, str]) -> None:
        self._engine = async_engine
        self._state = state
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        names = list(self._labels)
        values = list(self._labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        e = self._engine
        yield gauge("moeflow_engine_loop_alive", "1 while the engine loop runs",
                    float(e.is_loop_alive))
        yield gauge("moeflow_engine_draining", "1 while the instance drains", float(e.is_draining))
        yield gauge("moeflow_engine_transport_ok",
                    "1 when the last XCCL transport check passed (or there is no transport)",
                    float(self._state.get("transport_state", "none") != "unreachable"))
        yield gauge("moeflow_engine_in_flight_requests", "Open generate/prefill calls",
                    float(e.num_in_flight))
        yield counter("moeflow_engine_step_failures", "Steps that raised (their requests failed)",
                      float(e.num_step_failures_total))
        yield counter("moeflow_engine_step_isolations",
                      "Steps that raised with several requests, whose requests then ran one at "
                      "a time to find the cause (none of them failed for it)",
                      float(e.engine.scheduler.num_quarantines_total))
        yield counter("moeflow_engine_failed_requests",
                      "Requests ended by an engine failure (not by a client error)",
                      float(e.num_failed_requests_total))


def _open_transport(engine: LLMEngine) -> Transport | None:
    s = engine.settings
    if s.role not in (Role.PREFILL, Role.DECODE):
        return None
    return make_transport(s.transport, s.xccl_group, s.instance_name, redis_url=s.redis_url,
                          redis_password=s.redis_password_value)


def build_engine_app(engine: LLMEngine) -> FastAPI:
    async_engine = AsyncEngine(engine)
    registry = _metrics(engine)
    settings = engine.settings
    state: dict[str, object] = {}
    registry.register(_HealthCollector(
        async_engine, state, {"engine": settings.instance_name, "role": settings.role}))
    token = settings.internal_token_value
    # vLLM's model-server metrics (the endpoint picker's), per-token counters, process_*
    meter = add_model_server_metrics(registry, engine.stats, model_name=settings.name,
                                     role=str(settings.role), block_size=settings.block_size)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        transport = _open_transport(engine)
        puller = None
        if transport is not None:
            state["transport"] = transport
            if settings.role is Role.DECODE:
                puller = KVPuller(transport, settings.instance_name, settings.kv_transfer_timeout_s,
                                  internal_token=token)
                state["puller"] = puller
        async_engine.start()
        try:
            yield
        finally:
            async_engine.stop()
            engine.close()
            if puller is not None:
                await puller.aclose()
            if transport is not None:
                transport.close()

    async def pull_and_attach(request: GenerateRequest, ready: KVPullReady) -> None:
        puller = state.get("puller")
        assert isinstance(puller, KVPuller) and ready.landing is not None
        try:
            pulled = await puller.pull(request, ready.landing)
        except MoeflowError as exc:
            async_engine.fail(request.request_id, exc)
            return
        async_engine.attach_kv(
            request.request_id, None, pulled.response.first_token_id,
            num_cached_tokens=pulled.response.num_cached_tokens,
            kv_bytes=pulled.response.kv_bytes, kv_transfer_ms=pulled.transfer_ms,
        )

    def current_transport() -> Transport | None:
        transport = cast(Transport | None, state.get("transport"))
        if transport is None and isinstance(engine.runner, AttentionRunner):
            transport = engine.runner.client.transport
        return transport

    async def transport_state() -> TransportState:
        checked = await probe_transport(current_transport())
        state["transport_state"] = checked
        return checked

    app = FastAPI(title="moeflow engine", lifespan=lifespan)
    app.state.async_engine = async_engine
    app.add_middleware(InternalTokenMiddleware, token=token)
    add_coldstart_routes(app, engine.cold_start, registry)  # GET /v1/coldstart, histograms
    add_adapter_routes(app, engine.adapters)  # LoRA adapters: load, unload, list
    if isinstance(engine.runner, AttentionRunner):
        add_attention_routes(app, engine.runner.client, registry, settings.instance_name)

    install_error_handlers(app)  # the OpenAI envelope, as the gateway answers

    @app.post("/v1/generate")
    async def generate(request: GenerateRequest) -> StreamingResponse:
        # the instance's and the client's errors surface here, before the 200
        async_engine.check_accepting()
        engine.check_admission(request)
        chunks = async_engine.generate(request)
        timer = meter.start()

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    if isinstance(chunk, KVPullReady):
                        await pull_and_attach(request, chunk)
                        continue
                    if isinstance(chunk, TokenChunk):
                        timer.chunk(chunk)
                        yield chunk.model_dump_json().encode() + b"\n"
            except MoeflowError as exc:
                err = ErrorChunk(request_id=request.request_id, code=exc.code, message=exc.message)
                yield err.model_dump_json().encode() + b"\n"
            except Exception:  # e.g. a broken answer from a prefill instance: this stream only
                logger.exception("request %s failed", request.request_id)
                unexpected = MoeflowError(STEP_FAILED_MESSAGE)
                err = ErrorChunk(request_id=request.request_id, code=unexpected.code,
                                 message=unexpected.message)
                yield err.model_dump_json().encode() + b"\n"
            finally:
                await chunks.aclose()

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @app.post("/v1/prefill")
    async def prefill(body: PrefillRequest) -> PrefillResponse:
        """Prefill role: compute the prompt, send its KV to the decode rank, return token 1."""
        transport = cast(Transport | None, state.get("transport"))
        if settings.role is not Role.PREFILL or transport is None:
            raise InvalidRequestError(f"this instance's role is {settings.role!r}, not prefill")
        request = prefill_only(body.request)
        # the engine thread sends the KV layer by layer from the blocks, before freeing them
        sender = LayerwiseKVSender(transport, body.decode_rank, body.tag,
                                   settings.kv_transfer_timeout_s)
        last: TokenChunk | None = None
        async for item in async_engine.generate(request, exports_kv=sender):
            if isinstance(item, TokenChunk):
                last = item
        if last is None or not sender.is_done:
            raise BackendUnavailableError("the prefill produced no KV")
        if sender.error is not None:
            logger.warning("sending KV to %s failed: %s", body.decode_rank, sender.error)
            raise BackendUnavailableError(
                f"sending KV to the decode instance failed ({type(sender.error).__name__})")
        return PrefillResponse(
            request_id=request.request_id, first_token_id=last.token_ids[0],
            num_cached_tokens=last.num_cached_tokens, kv_bytes=sender.num_bytes,
            send_ms=sender.send_ms, first_layer_send_ms=sender.first_layer_ms,
        )

    @app.get("/v1/model_info")
    async def model_info() -> ModelInfo:
        return engine.model_info()

    @app.get("/v1/stats")
    async def stats() -> EngineStats:
        return engine.stats().model_copy(update={
            "is_loop_alive": async_engine.is_loop_alive,
            "is_transport_ok": await transport_state() != "unreachable",
            "is_draining": async_engine.is_draining,
        })

    @app.post("/v1/drain")
    async def drain() -> JSONResponse:
        """Stop admitting requests; those in flight finish. Readiness answers 503 "draining"."""
        async_engine.drain()
        logger.warning("draining: %d requests in flight", async_engine.num_in_flight)
        return JSONResponse({"status": "draining", "num_in_flight": async_engine.num_in_flight})

    add_health_routes(app, is_loop_alive=lambda: async_engine.is_loop_alive,
                      is_draining=lambda: async_engine.is_draining,
                      transport_state=transport_state, extra={"role": settings.role})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        await transport_state()  # the transport gauge shows the state at scrape time
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
