"""The gateway app factory: ``build_app(settings)`` wires routers, middleware and services.

Clients and background tasks live in the lifespan and on ``app.state``; nothing is global, so
tests build as many independent apps as they like.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from moeflow.gateway.api_docs import install_api_docs
from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.discovery import Discovery, KubeDiscovery, StaticDiscovery
from moeflow.gateway.engine_client import EngineClient
from moeflow.gateway.generation import GenerationService
from moeflow.gateway.kube_scale import KubeScaleUp
from moeflow.gateway.metrics import GatewayMetrics
from moeflow.gateway.middleware import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    RequestCountMiddleware,
    TenantGate,
)
from moeflow.gateway.quota import quota_from_settings
from moeflow.gateway.quota_service import MeteredGenerationService, TenantMetrics
from moeflow.gateway.registry import ModelRegistry
from moeflow.gateway.routes import chat, completions, health, models, responses, tokenize, usage
from moeflow.gateway.scale_from_zero import ScaleUpRequester, WakeQueue
from moeflow.gateway.settings import GatewaySettings
from moeflow.gateway.status_page import router as status_router
from moeflow.gateway.tenants import TenantSource
from moeflow.web.errors import install_error_handlers
from moeflow.web.internal_auth import internal_headers


def build_app(
    settings: GatewaySettings,
    *,
    discovery: Discovery | None = None,
    scale_up: ScaleUpRequester | None = None,
) -> FastAPI:
    """``discovery`` replaces the one ``settings`` name (the local scaler passes its own; the
    instances in ``settings.engine_urls`` are awaited at start-up either way); ``scale_up``
    turns on scale from zero (``moeflow.gateway.scale_from_zero``). Kubernetes discovery
    without ``scale_up`` wakes its Model itself (``kube_scale_from_zero``, default on)."""

    gate = TenantGate(
        TenantSource(settings.tenants_file,
                     flat_keys=[k.get_secret_value() for k in settings.api_keys],
                     admin_keys=[k.get_secret_value() for k in settings.admin_api_keys],
                     reload_interval_s=settings.tenants_reload_interval_s),
        quota_from_settings(settings),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        token = settings.internal_token
        client = EngineClient(
            connect_timeout_s=settings.engine_connect_timeout_s,
            request_timeout_s=settings.request_timeout_s,
            headers=internal_headers(token.get_secret_value() if token else None),
        )
        registry = ModelRegistry(client)
        metrics = GatewayMetrics(registry, settings.request_timeout_s)
        gate.metrics = tenant_metrics = TenantMetrics(metrics.registry)
        tenant_metrics.set_backend(gate.quota.backend if gate.quota else "local")
        if gate.quota is not None:
            gate.quota.on_backend = tenant_metrics.set_backend
        tasks = [asyncio.create_task(registry.poll_stats(settings.stats_poll_interval_s))]
        found: Discovery
        if discovery is not None:
            found = discovery
        elif settings.discovery == "kubernetes":
            found = KubeDiscovery(settings.namespace, settings.served_model_name)
        else:
            found = StaticDiscovery(settings.engine_urls)
        if discovery is not None or settings.discovery == "kubernetes":
            tasks.append(
                asyncio.create_task(registry.follow(found, settings.discovery_interval_s))
            )
        if settings.discovery == "static":
            await registry.discover(settings.engine_urls, settings.engine_startup_timeout_s)
            await registry.refresh_stats()
        requester = scale_up
        kube_scale: KubeScaleUp | None = None
        if (requester is None and settings.discovery == "kubernetes"
                and settings.kube_scale_from_zero):
            requester = kube_scale = KubeScaleUp(settings.namespace)
        wake = WakeQueue(
            requester=requester,
            is_ready=registry.is_awake,
            probe=lambda: registry.probe(found),
            max_waiting=settings.max_waiting_for_scale_up,
            timeout_s=settings.scale_up_timeout_s,
            retry_after_s=settings.retry_after_s,
            on_count=lambda model, n: metrics.waiting_for_scale_up.labels(model).set(n),
        )
        app.state.service = MeteredGenerationService(
            settings, registry, client, metrics, wake, quota=gate.quota,
            tenant_metrics=tenant_metrics)
        try:
            yield
        finally:
            wake.close()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            found.close()
            if kube_scale is not None:
                kube_scale.close()
            await client.aclose()
            if gate.quota is not None:
                await gate.quota.aclose()

    # /docs from local files (air-gapped clusters): moeflow.gateway.api_docs
    app = FastAPI(title="MoEFlow gateway", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    install_api_docs(app)
    install_error_handlers(app)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(tokenize.router)
    app.include_router(responses.router)
    app.include_router(status_router)
    app.include_router(usage.router)
    app.state.tenant_gate = gate

    @app.get("/metrics")
    async def metrics(service: ServiceDep) -> PlainTextResponse:
        service.metrics.refresh_instance_gauges()
        return PlainTextResponse(
            generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    def count_request(model: str, endpoint: str, status: str) -> None:
        service: GenerationService | None = getattr(app.state, "service", None)
        if service is not None:
            service.metrics.requests.labels(model, endpoint, status).inc()

    # Added last is outermost: counting sees every answer, then the size limit, then auth, so
    # unauthenticated giants are refused cheaply.
    app.add_middleware(ApiKeyMiddleware, gate=gate)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestCountMiddleware, count=count_request)
    return app
