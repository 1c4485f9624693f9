"""Readiness decisions, the XCCL transport probe (real Redis), and the internal-token middleware.

The middleware is exercised through a real ASGI app; the engine app behind real HTTP is in
tests/integration/engine/test_engine_robustness.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from moeflow.engine.health import liveness, probe_transport, readiness
from moeflow.web.internal_auth import (
    INTERNAL_TOKEN_ENV,
    INTERNAL_TOKEN_HEADER,
    InternalTokenMiddleware,
    internal_headers,
    token_from_env,
)
from moeflow.xccl import make_transport
from moeflow.xccl.redis_server import start_local_redis


@pytest.mark.parametrize(("alive", "transport", "draining", "status", "code"), [
    (True, "ok", False, "ok", 200),
    (True, "none", False, "ok", 200),
    (True, "ok", True, "draining", 503),
    (True, "unreachable", False, "unhealthy", 503),
    (True, "unreachable", True, "unhealthy", 503),  # broken outranks draining
    (False, "ok", False, "unhealthy", 503),
    (False, "none", True, "unhealthy", 503),
])
def test_readiness(alive: bool, transport: str, draining: bool, status: str, code: int) -> None:
    got_code, got = readiness(is_loop_alive=alive, transport=transport,  # type: ignore[arg-type]
                              is_draining=draining)
    assert (got_code, got["status"]) == (code, status)
    assert got["loop"] == ("running" if alive else "dead") and got["transport"] == transport


def test_liveness() -> None:
    assert liveness(is_loop_alive=True) == (200, {"status": "ok"})
    assert liveness(is_loop_alive=False) == (503, {"status": "unhealthy", "loop": "dead"})


def test_probe_transport_memory_and_none() -> None:
    assert asyncio.run(probe_transport(None)) == "none"
    transport = make_transport("memory", "probe-group", "a")
    assert asyncio.run(probe_transport(transport)) == "ok"
    transport.close()
    assert asyncio.run(probe_transport(transport)) == "unreachable"


def test_probe_transport_follows_a_real_redis(tmp_path: Path) -> None:
    server = start_local_redis(tmp_path / "redis")
    try:
        transport = make_transport("redis", "probe-group", "a", redis_url=server.url)
        try:
            assert asyncio.run(probe_transport(transport)) == "ok"
            server.stop()
            assert asyncio.run(probe_transport(transport, timeout_s=5)) == "unreachable"
        finally:
            transport.close()
    finally:
        server.stop()


def _guarded_app(token: str | None) -> FastAPI:
    app = FastAPI()
    app.add_middleware(InternalTokenMiddleware, token=token)

    @app.post("/v1/generate")
    async def generate() -> dict[str, str]:
        return {"ok": "yes"}

    for path in ("/health", "/health/live", "/health/ready", "/metrics", "/healthz"):
        app.add_api_route(path, lambda: {"ok": "yes"}, methods=["GET"])
    return app


def _call(app: FastAPI, method: str, path: str,
          headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
            return await client.request(method, path, headers=headers or {})

    return asyncio.run(go())


def test_the_middleware_refuses_calls_without_the_token() -> None:
    app = _guarded_app("s3cret-token")
    for headers in (None, {INTERNAL_TOKEN_HEADER: "s3cret-tokeN"}, {INTERNAL_TOKEN_HEADER: ""},
                    {"authorization": "Bearer s3cret-token"}):
        response = _call(app, "POST", "/v1/generate", headers)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "invalid_internal_token"
        assert error["type"] == "authentication_error"
        assert "s3cret" not in response.text
    assert _call(app, "POST", "/v1/generate", internal_headers("s3cret-token")).status_code == 200
    for path in ("/health", "/health/live", "/health/ready", "/metrics"):
        assert _call(app, "GET", path).status_code == 200, path
    assert _call(app, "GET", "/healthz").status_code == 401  # open paths match exactly


def test_without_a_token_everything_is_open() -> None:
    for token in (None, ""):
        assert _call(_guarded_app(token), "POST", "/v1/generate").status_code == 200
    assert internal_headers(None) == {} and internal_headers("") == {}


def test_token_from_env() -> None:
    assert token_from_env({}) is None
    assert token_from_env({INTERNAL_TOKEN_ENV: ""}) is None
    assert token_from_env({INTERNAL_TOKEN_ENV: "abc"}) == "abc"
