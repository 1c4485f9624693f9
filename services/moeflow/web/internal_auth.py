"""Internal authentication: engine instances take work only from the platform.

Every process of one deployment (gateway, engines, expert instances, warm workers, the expert
balancer) gets the same secret in the environment variable ``MOEFLOW_INTERNAL_TOKEN``. A caller
sends it in the ``x-moeflow-internal-token`` header (``internal_headers``); an instance checks it
with ``InternalTokenMiddleware`` (constant-time comparison, the token is never logged). Probes
and scrapers need no token: ``/health``, ``/health/live``, ``/health/ready`` and ``/metrics``
stay open. Without a token (``None``, or the variable unset or empty) everything is open, as a
laptop run without the variable is.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterable, Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from moeflow.web.errors import error_body

INTERNAL_TOKEN_ENV = "MOEFLOW_INTERNAL_TOKEN"
INTERNAL_TOKEN_HEADER = "x-moeflow-internal-token"
OPEN_PATHS: tuple[str, ...] = ("/health", "/health/live", "/health/ready", "/metrics")
"""Paths answered without a token (exact matches): probes and Prometheus."""

_HEADER = INTERNAL_TOKEN_HEADER.encode()


def token_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The deployment's internal token, or None when ``MOEFLOW_INTERNAL_TOKEN`` is unset/empty."""
    value = (os.environ if environ is None else environ).get(INTERNAL_TOKEN_ENV, "")
    return value or None


def internal_headers(token: str | None) -> dict[str, str]:
    """Headers that authenticate a call to another instance ({} without a token)."""
    return {INTERNAL_TOKEN_HEADER: token} if token else {}


def is_valid_token(presented: bytes | None, token: bytes) -> bool:
    """Constant-time check of a presented header value against the token."""
    if presented is None:
        return False
    return hmac.compare_digest(presented, token)


class InternalTokenMiddleware:
    """Pure ASGI: refuses HTTP requests without the right ``x-moeflow-internal-token`` with
    401 in the OpenAI envelope (code ``invalid_internal_token``); ``open_paths`` pass. With
    ``token`` None (or empty) it lets everything through."""

    def __init__(self, app: ASGIApp, token: str | None,
                 open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app = app
        self._token = token.encode() if token else None
        self._open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self._token is None or scope["type"] not in ("http", "websocket")
                or scope["path"] in self._open_paths):
            await self.app(scope, receive, send)
            return
        presented = next((v for k, v in scope["headers"] if k == _HEADER), None)
        if is_valid_token(presented, self._token):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # nothing serves websockets; refuse them all the same
            await send({"type": "websocket.close", "code": 1008})
            return
        message = ("missing internal token" if presented is None else "invalid internal token")
        body = json.dumps(error_body(
            f"{message}: this instance takes requests from the platform only",
            "authentication_error", "invalid_internal_token",
        )).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})
