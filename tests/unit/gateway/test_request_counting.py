"""RequestCountMiddleware: every /v1 answer is counted once with its final status, whoever gave
it (the middleware stack of the gateway around a small Starlette app, over httpx ASGI)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from moeflow.domain.errors import BackendUnavailableError
from moeflow.gateway.middleware import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    RequestCountMiddleware,
    endpoint_of,
    final_status,
    request_record,
)

KEY = "sk-count"


async def chat(request: Request) -> JSONResponse:
    await request.body()
    request_record(request.scope).model = "served"
    return JSONResponse({"ok": True})


async def failing_stream(request: Request) -> StreamingResponse:
    record = request_record(request.scope)
    record.model = "served"

    async def events() -> AsyncIterator[str]:
        yield "data: {}\n\n"
        record.failed(BackendUnavailableError("gone"))
        yield 'data: {"error": {}}\n\n'

    return StreamingResponse(events(), media_type="text/event-stream")


async def crash(request: Request) -> PlainTextResponse:
    raise RuntimeError("boom")


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def stack() -> tuple[ASGIApp, Counter[tuple[str, str, str]]]:
    counts: Counter[tuple[str, str, str]] = Counter()
    inner = Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", failing_stream, methods=["POST"]),
        Route("/v1/models", crash),
        Route("/health", health),
    ])
    app: ASGIApp = ApiKeyMiddleware(inner, api_keys=[KEY])
    app = BodySizeLimitMiddleware(app, max_body_bytes=1024)
    app = RequestCountMiddleware(app, count=lambda *labels: counts.update([labels]))
    return app, counts


def client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://gateway", headers={"authorization": f"Bearer {KEY}"})


async def test_each_answer_is_counted_once_with_its_status() -> None:
    app, counts = stack()
    async with client(app) as c:
        assert (await c.post("/v1/chat/completions", content=b"{}")).status_code == 200
        assert (await c.post("/v1/chat/completions", content=b"x" * 2048)).status_code == 413
        unauthorized = await c.post("/v1/chat/completions", headers={"authorization": "no"})
        assert unauthorized.status_code == 401
        assert (await c.get("/v1/nowhere")).status_code == 404
        assert (await c.get("/v1/models")).status_code == 500
        assert (await c.get("/health")).status_code == 200  # not a /v1 route: not counted
    assert counts == Counter({
        ("served", "chat", "200"): 1,
        ("", "chat", "413"): 1,
        ("", "chat", "401"): 1,
        ("", "other", "404"): 1,
        ("", "models", "500"): 1,
    })


async def test_a_stream_that_fails_after_its_200_counts_the_failure() -> None:
    app, counts = stack()
    async with client(app) as c:
        r = await c.post("/v1/completions")
    assert r.status_code == 200 and "error" in r.text
    assert counts == Counter({("served", "completions", "503"): 1})


async def test_a_client_that_leaves_mid_stream_counts_499() -> None:
    counts: Counter[tuple[str, str, str]] = Counter()

    async def endless(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        raise asyncio.CancelledError  # what the server does to a request whose client left

    app = RequestCountMiddleware(endless, count=lambda *labels: counts.update([labels]))
    with pytest.raises(asyncio.CancelledError):
        await app({"type": "http", "path": "/v1/completions", "headers": []},
                  _no_body, _discard)
    assert counts == Counter({("", "completions", "499"): 1})


async def _no_body() -> dict[str, object]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _discard(message: object) -> None:
    return None


def test_final_status_rules() -> None:
    from moeflow.gateway.middleware import RequestRecord

    plain = RequestRecord()
    assert final_status(200, True, plain, None) == "200"
    assert final_status(200, False, plain, None) == "499"  # the app stopped a closed stream
    assert final_status(None, False, plain, RuntimeError()) == "500"
    assert final_status(200, False, plain, OSError()) == "499"
    assert endpoint_of("/v1/models/tiny") == "models"
    assert endpoint_of("/v1/chat/completions") == "chat"
    assert endpoint_of("/v1/chat/completions/x") == "other"
