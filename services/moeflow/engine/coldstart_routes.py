"""The engine's cold-start face: ``GET /v1/coldstart`` and ``moeflow_coldstart_*`` histograms.

``add_coldstart_routes`` is called by ``build_engine_app``. The first-token mark is a pure ASGI
middleware on ``POST /v1/generate`` (the first non-empty body chunk of the first response), so
the generate route itself knows nothing of cold starts. Ready is marked by whoever runs the
HTTP server once its sockets listen (``launch.ReadyServer``), through ``observe_ready``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeflow.domain.coldstart import STEPS, ColdStartRecord

BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ColdStartMetrics:
    def __init__(self, record: ColdStartRecord, registry: CollectorRegistry) -> None:
        self.record = record
        self._histograms = {
            step: Histogram(f"moeflow_coldstart_{step}_seconds",
                            f"Cold start of this instance: the {step.replace('_', ' ')} step",
                            buckets=BUCKETS_S, registry=registry)
            for step in STEPS
        }
        self._observed: set[str] = set()

    def observe(self) -> None:
        """Record every step that has ended and was not recorded yet (once each)."""
        for step, seconds in self.record.seconds().items():
            if step not in self._observed:
                self._observed.add(step)
                self._histograms[step].observe(seconds)

    def observe_ready(self) -> None:
        self.record.mark_ready()
        self.observe()


class _FirstTokenMiddleware:
    def __init__(self, app: ASGIApp, metrics: ColdStartMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = self.metrics.record
        if (scope["type"] != "http" or record.first_token_s is not None
                or scope.get("path") != "/v1/generate"):
            await self.app(scope, receive, send)
            return

        async def watching_send(message: Message) -> None:
            await send(message)
            is_body = message["type"] == "http.response.body" and bool(message.get("body"))
            if is_body and record.mark_first_token():
                self.metrics.observe()

        await self.app(scope, receive, watching_send)


def add_coldstart_routes(app: FastAPI, record: ColdStartRecord,
                         registry: CollectorRegistry) -> ColdStartMetrics:
    metrics = ColdStartMetrics(record, registry)
    app.state.coldstart_metrics = metrics
    app.add_middleware(_FirstTokenMiddleware, metrics=metrics)

    @app.get("/v1/coldstart")
    async def coldstart() -> JSONResponse:
        body: dict[str, Any] = record.as_dict()
        return JSONResponse(body)

    return metrics
