"""ApiKeyMiddleware and BodySizeLimitMiddleware around a tiny Starlette app (httpx ASGI)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from moeflow.gateway.app import build_app
from moeflow.gateway.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware
from moeflow.gateway.settings import GatewaySettings

KEYS = ["sk-first", "sk-second"]
LIMIT = 1024


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"path": request.url.path, "num_bytes": len(body)})


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def inner_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/echo", echo, methods=["GET", "POST"]),
            Route("/health", ok),
            Route("/metrics", ok),
            Route("/status", ok),
        ]
    )


def client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


def assert_error_envelope(response: httpx.Response, status: int, error_type: str, code: str) -> str:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == error_type
    assert body["error"]["code"] == code
    assert body["error"]["param"] is None
    return str(body["error"]["message"])


async def chunks(total: int, size: int = 256) -> AsyncIterator[bytes]:
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


# -- API keys -------------------------------------------------------------------------------------


@pytest.fixture
def auth_app() -> ASGIApp:
    return ApiKeyMiddleware(inner_app(), api_keys=KEYS)


async def test_a_request_without_a_key_gets_401_in_the_openai_envelope(auth_app: ASGIApp) -> None:
    async with client(auth_app) as c:
        response = await c.post("/v1/echo", json={"a": 1})
    message = assert_error_envelope(response, 401, "authentication_error", "invalid_api_key")
    assert "missing API key" in message
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header",
    ["Bearer sk-wrong", "Bearer sk-first-but-longer", "Basic sk-first", "sk-first", "Bearer "],
)
async def test_a_wrong_key_gets_401(auth_app: ASGIApp, header: str) -> None:
    async with client(auth_app) as c:
        response = await c.get("/v1/echo", headers={"Authorization": header})
    message = assert_error_envelope(response, 401, "authentication_error", "invalid_api_key")
    assert "invalid API key" in message
    assert "sk-" not in message  # keys are never echoed back


@pytest.mark.parametrize("key", KEYS)
async def test_every_configured_key_is_accepted(auth_app: ASGIApp, key: str) -> None:
    async with client(auth_app) as c:
        response = await c.post(
            "/v1/echo", content=b"abc", headers={"Authorization": f"Bearer {key}"}
        )
    assert response.status_code == 200
    assert response.json() == {"path": "/v1/echo", "num_bytes": 3}


async def test_the_bearer_scheme_is_case_insensitive(auth_app: ASGIApp) -> None:
    async with client(auth_app) as c:
        response = await c.get("/v1/echo", headers={"Authorization": "bearer sk-second"})
    assert response.status_code == 200


async def test_health_stays_open_without_a_key(auth_app: ASGIApp) -> None:
    async with client(auth_app) as c:
        response = await c.get("/health")
    assert response.status_code == 200
    assert response.text == "ok"


@pytest.mark.parametrize("path", ["/metrics", "/status"])
async def test_metrics_and_status_need_a_key(auth_app: ASGIApp, path: str) -> None:
    async with client(auth_app) as c:
        missing = await c.get(path)
        keyed = await c.get(path, headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert_error_envelope(missing, 401, "authentication_error", "invalid_api_key")
    assert keyed.status_code == 200  # flat keys are admin keys while no admin key exists


async def test_without_configured_keys_everything_is_open() -> None:
    async with client(ApiKeyMiddleware(inner_app(), api_keys=[])) as c:
        response = await c.get("/v1/echo")
    assert response.status_code == 200


# -- body size ------------------------------------------------------------------------------------


@pytest.fixture
def limited_app() -> ASGIApp:
    return BodySizeLimitMiddleware(inner_app(), max_body_bytes=LIMIT)


async def test_a_body_within_the_limit_passes(limited_app: ASGIApp) -> None:
    async with client(limited_app) as c:
        response = await c.post("/v1/echo", content=b"x" * LIMIT)
    assert response.status_code == 200
    assert response.json()["num_bytes"] == LIMIT


async def test_a_content_length_over_the_limit_gets_413(limited_app: ASGIApp) -> None:
    async with client(limited_app) as c:
        response = await c.post("/v1/echo", content=b"x" * (LIMIT + 1))
    message = assert_error_envelope(response, 413, "invalid_request_error", "request_too_large")
    assert str(LIMIT) in message


async def test_a_streamed_body_within_the_limit_passes(limited_app: ASGIApp) -> None:
    async with client(limited_app) as c:
        response = await c.post("/v1/echo", content=chunks(LIMIT))
    assert response.status_code == 200
    assert response.json()["num_bytes"] == LIMIT


async def test_a_streamed_body_over_the_limit_gets_413(limited_app: ASGIApp) -> None:
    """No Content-Length (chunked upload): the limit is enforced while the body streams in."""
    async with client(limited_app) as c:
        response = await c.post("/v1/echo", content=chunks(4 * LIMIT))
    assert_error_envelope(response, 413, "invalid_request_error", "request_too_large")


async def test_the_gateway_app_answers_413_for_a_streamed_body_over_the_limit() -> None:
    """The real composition: FastAPI reads the body inside its request handler."""
    app = build_app(GatewaySettings(max_body_bytes=LIMIT))
    async with client(app) as c:
        response = await c.post(
            "/v1/chat/completions",
            content=chunks(4 * LIMIT),
            headers={"content-type": "application/json"},
        )
    assert_error_envelope(response, 413, "invalid_request_error", "request_too_large")


async def test_size_limit_runs_before_authentication_in_the_gateway_app() -> None:
    app = build_app(GatewaySettings(max_body_bytes=LIMIT, api_keys=("sk-first",)))
    async with client(app) as c:
        too_big = await c.post("/v1/chat/completions", content=b"x" * (LIMIT + 1))
        no_key = await c.post("/v1/chat/completions", json={})
    assert too_big.status_code == 413
    assert no_key.status_code == 401
