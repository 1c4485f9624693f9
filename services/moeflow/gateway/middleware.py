"""Pure-ASGI middleware: API-key authentication and the request-body size limit.

Keys are compared with ``secrets.compare_digest`` against every configured key (no early exit
that would leak which key matched) and never logged. Health and metrics stay open for probes.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeflow.domain.errors import AuthenticationError, MoeflowError, RequestTooLargeError
from moeflow.web.errors import error_body

_OPEN_PATHS = ("/health", "/metrics", "/status")


async def _send_error(send: Send, exc: MoeflowError) -> None:
    body = json.dumps(error_body(exc.message, exc.error_type, exc.code, exc.param)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(exc, AuthenticationError):
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_keys: Sequence[str]) -> None:
        self.app = app
        self._keys = [k.encode() for k in api_keys]

    def _is_authorized(self, header: bytes | None) -> bool:
        if header is None or not header.lower().startswith(b"bearer "):
            return False
        presented = header[7:].strip()
        matched = False
        for key in self._keys:
            matched |= secrets.compare_digest(presented, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"].startswith(_OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization")
        if not self._is_authorized(header):
            message = "missing API key" if header is None else "invalid API key"
            hint = "send 'Authorization: Bearer <key>'"
            await _send_error(send, AuthenticationError(f"{message}: {hint}"))
            return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Refuses bodies over ``max_body_bytes`` (by Content-Length, or while streaming in)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = RequestTooLargeError(
            f"request body exceeds the limit of {self.max_body_bytes} bytes"
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _send_error(send, too_large)
            return
        num_received = 0
        response_started = False
        refused = False

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return  # the client already has its 413; drop whatever the app answers
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        async def limited_receive() -> Message:
            nonlocal num_received, refused
            message = await receive()
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > self.max_body_bytes:
                    if not refused and not response_started:
                        await _send_error(send, too_large)
                    refused = True
                    # Raised into the app, which may turn it into its own error response (FastAPI:
                    # 400 "error parsing the body"); guarded_send drops that one.
                    raise too_large
            return message

        try:
            await self.app(scope, limited_receive, guarded_send)
        except RequestTooLargeError:
            if not refused:
                raise
