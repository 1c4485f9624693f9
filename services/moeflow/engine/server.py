"""HTTP face of one engine instance: generate (NDJSON stream), model info, stats, health.

Errors become responses through ``moeflow.web.errors``, as in the gateway. The body of
``POST /v1/generate`` is a ``GenerateRequest``; the response streams one JSON ``TokenChunk``
per line, or an ``ErrorChunk`` if the request fails after the stream began. Closing the
connection aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
from moeflow.engine.ae.attention_routes import add_attention_routes
from moeflow.engine.ae.attention_runner import AttentionRunner
from moeflow.engine.async_engine import AsyncEngine, KVPullReady
from moeflow.engine.coldstart_routes import add_coldstart_routes
from moeflow.engine.disagg import KVPuller, prefill_only, send_kv
from moeflow.engine.llm_engine import LLMEngine
from moeflow.web.errors import install_error_handlers
from moeflow.xccl import Transport, make_transport

logger = logging.getLogger(__name__)


def _metrics(engine: LLMEngine) -> CollectorRegistry:
    registry = CollectorRegistry()
    labels = {"instance": engine.settings.instance_name, "role": engine.settings.role}

    def gauge(name: str, doc: str, fn: object) -> None:
        g = Gauge(name, doc, list(labels), registry=registry)
        g.labels(**labels).set_function(fn)  # type: ignore[arg-type]

    gauge("moeflow_engine_waiting_requests", "Requests queued", lambda: engine.stats().num_waiting)
    gauge("moeflow_engine_running_requests", "Requests running", lambda: engine.stats().num_running)
    gauge("moeflow_engine_kv_cache_usage_ratio", "Share of KV blocks in use",
          lambda: engine.stats().kv_usage_ratio)
    return registry


def _open_transport(engine: LLMEngine) -> Transport | None:
    s = engine.settings
    if s.role not in (Role.PREFILL, Role.DECODE):
        return None
    return make_transport(s.transport, s.xccl_group, s.instance_name, redis_url=s.redis_url)


def build_engine_app(engine: LLMEngine) -> FastAPI:
    async_engine = AsyncEngine(engine)
    registry = _metrics(engine)
    settings = engine.settings
    state: dict[str, object] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        transport = _open_transport(engine)
        puller = None
        if transport is not None:
            state["transport"] = transport
            if settings.role is Role.DECODE:
                puller = KVPuller(transport, settings.instance_name, settings.kv_transfer_timeout_s)
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

    async def pull_and_attach(request: GenerateRequest) -> None:
        puller = state.get("puller")
        assert isinstance(puller, KVPuller)
        try:
            pulled = await puller.pull(request)
        except MoeflowError as exc:
            async_engine.fail(request.request_id, exc)
            return
        async_engine.attach_kv(
            request.request_id, pulled.kv, pulled.response.first_token_id,
            num_cached_tokens=pulled.response.num_cached_tokens,
            kv_bytes=pulled.response.kv_bytes, kv_transfer_ms=pulled.transfer_ms,
        )

    app = FastAPI(title="moeflow engine", lifespan=lifespan)
    app.state.async_engine = async_engine
    add_coldstart_routes(app, engine.cold_start, registry)  # GET /v1/coldstart, histograms
    if isinstance(engine.runner, AttentionRunner):
        add_attention_routes(app, engine.runner.client, registry, settings.instance_name)

    install_error_handlers(app)  # the OpenAI envelope, as the gateway answers

    @app.post("/v1/generate")
    async def generate(request: GenerateRequest) -> StreamingResponse:
        engine.check_admission(request)  # the client's errors surface here, before the 200
        chunks = async_engine.generate(request)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    if isinstance(chunk, KVPullReady):
                        await pull_and_attach(request)
                        continue
                    yield chunk.model_dump_json().encode() + b"\n"
            except MoeflowError as exc:
                err = ErrorChunk(request_id=request.request_id, code=exc.code, message=exc.message)
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
        last: TokenChunk | None = None
        async for item in async_engine.generate(request, exports_kv=True):
            if isinstance(item, TokenChunk):
                last = item
        kv = engine.exported_kv.pop(request.request_id, None)
        if last is None or kv is None:
            raise BackendUnavailableError("the prefill produced no KV")
        kv_bytes = kv.numel() * kv.element_size()
        send_ms = await asyncio.to_thread(
            send_kv, transport, body.decode_rank, body.tag, kv, settings.kv_transfer_timeout_s
        )
        return PrefillResponse(
            request_id=request.request_id, first_token_id=last.token_ids[0],
            num_cached_tokens=last.num_cached_tokens, kv_bytes=kv_bytes, send_ms=send_ms,
        )

    @app.get("/v1/model_info")
    async def model_info() -> ModelInfo:
        return engine.model_info()

    @app.get("/v1/stats")
    async def stats() -> EngineStats:
        return engine.stats()

    @app.get("/health")
    async def health() -> JSONResponse:
        if not async_engine.is_healthy:
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok", "role": engine.settings.role})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
