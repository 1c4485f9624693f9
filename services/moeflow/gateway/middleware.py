"""Pure-ASGI middleware: request counting, API-key authentication and the body size limit.

Keys are compared with ``secrets.compare_digest`` against every configured key (no early exit
that would leak which key matched) and never logged. Health and metrics stay open for probes.

``RequestCountMiddleware`` sits outside the others, so every answer to a ``/v1`` request is
counted exactly once, whoever gave it: this middleware's siblings (401, 413), FastAPI's
validation (400), the routes (404, 429, the engine's errors, 200) or the last-resort handler
(500). It is the only writer of ``moeflow_requests_total``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.requests import ClientDisconnect
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


CLIENT_CLOSED = "499"
"""The status recorded for a request whose client left before the answer was complete (nginx's
convention; no client ever receives it)."""

_RECORD_KEY = "moeflow.request_record"
_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
              "/v1/models": "models"}


@dataclass
class RequestRecord:
    """What a route tells ``RequestCountMiddleware`` about its request: the served model (left
    empty until the route has found it, so label values never come from the client), and the
    real outcome of a stream that failed after its 200 status line went out."""

    model: str = ""
    failed_status: int | None = None

    def failed(self, exc: MoeflowError) -> None:
        """The request failed with ``exc``: after a 200 status line, its SSE error event."""
        self.failed_status = exc.status_code


def request_record(scope: Scope) -> RequestRecord:
    """This request's record (a detached one when no ``RequestCountMiddleware`` is installed)."""
    record = scope.get(_RECORD_KEY)
    return record if isinstance(record, RequestRecord) else RequestRecord()


def endpoint_of(path: str) -> str:
    """The bounded endpoint label of a ``/v1`` path (``other`` for unknown routes)."""
    if path.startswith("/v1/models/"):
        return "models"
    return _ENDPOINTS.get(path, "other")


def final_status(started: int | None, completed: bool, record: RequestRecord,
                 error: BaseException | None) -> str:
    """The status label of one finished request: the status line sent, unless the stream behind
    it failed (the error event's status) or the client left before the end (499); an exception
    that escaped before any answer is a 500, as the server's last-resort handler answers."""
    if started is not None and completed:
        return str(record.failed_status or started)
    if isinstance(error, asyncio.CancelledError | ClientDisconnect | OSError):
        return CLIENT_CLOSED
    if error is not None:
        return "500" if started is None else str(record.failed_status or 500)
    return CLIENT_CLOSED  # the app returned without finishing: a stream the client closed


class RequestCountMiddleware:
    """Counts every ``/v1`` request once, with its final status (see ``final_status``), through
    ``count(model, endpoint, status)``."""

    def __init__(self, app: ASGIApp, count: Callable[[str, str, str], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        record = RequestRecord()
        scope[_RECORD_KEY] = record
        started: int | None = None
        completed = False

        async def watched_send(message: Message) -> None:
            nonlocal started, completed
            if message["type"] == "http.response.start":
                started = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True

        error: BaseException | None = None
        try:
            await self.app(scope, receive, watched_send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.count(record.model, endpoint_of(scope["path"]),
                       final_status(started, completed, record, error))
