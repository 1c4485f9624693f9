"""Pure-ASGI middleware: request counting, API keys and tenants, and the body size limit.

``ApiKeyMiddleware`` finds the caller's tenant by the sha256 of its key (``moeflow.gateway.
tenants``; keys are never logged or echoed), applies the tenant's request quotas (requests per
minute, concurrent requests: ``moeflow.gateway.quota``) to every ``/v1`` request, sets
``current_tenant`` for the routes, and writes one access-log line per request with the tenant's
name. ``/health*`` stays open (it names model states only); ``/metrics``, ``/status*`` and
``/admin/*`` need an admin tenant's key (403 for other tenants). With no key configured at all,
everything is open (a local gateway).

``RequestCountMiddleware`` sits outside the others, so every answer to a ``/v1`` request is
counted exactly once, whoever gave it: this middleware's siblings (401, 413, 429), FastAPI's
validation (400), the routes (404, 429, the engine's errors, 200) or the last-resort handler
(500). It is the only writer of ``moeflow_requests_total``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeflow.domain.errors import AuthenticationError, MoeflowError, RequestTooLargeError
from moeflow.gateway.quota import Lease, Quota, QuotaExceededError
from moeflow.gateway.quota_service import TenantMetrics
from moeflow.gateway.tenants import Tenant, TenantSource, current_tenant, request_prompts
from moeflow.web.errors import error_body

_OPEN_PATHS = ("/health",)
_ADMIN_PATHS = ("/metrics", "/status", "/admin/")
access_logger = logging.getLogger("moeflow.gateway.access")


class PermissionDeniedError(MoeflowError):
    """A valid key without the right to this path (an admin path, for a non-admin tenant)."""

    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


def _presented_key(header: bytes | None, *, allow_basic: bool) -> str | None:
    """The key of an ``Authorization`` header: ``Bearer <key>``, or on admin paths also
    ``Basic`` with the key as password (a browser asks for it and sends it with the status
    page's own requests)."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(b" ")
    value = value.strip()
    if scheme.lower() == b"bearer" and value:
        return value.decode("latin-1")
    if scheme.lower() == b"basic" and allow_basic:
        try:
            _, _, password = base64.b64decode(value, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return None
        return password.decode("latin-1") or None
    return None


async def _send_error(send: Send, exc: MoeflowError, *, basic_realm: bool = False) -> None:
    body = json.dumps(error_body(exc.message, exc.error_type, exc.code, exc.param)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(exc, AuthenticationError):
        headers.append((b"www-authenticate", b"Bearer"))
        if basic_realm:
            headers.append((b"www-authenticate", b'Basic realm="moeflow admin"'))
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class TenantGate:
    """What ``ApiKeyMiddleware`` consults: the tenants, their quotas (None: no quotas) and the
    per-tenant metrics (set once the app's metrics registry exists)."""

    tenants: TenantSource
    quota: Quota | None = None
    metrics: TenantMetrics | None = None


class ApiKeyMiddleware:
    """Authenticates by API key, authorizes admin paths, applies request quotas (module doc).

    ``api_keys`` alone (no ``gate``) is a gateway with one tenant, ``default``, and no quotas.
    """

    def __init__(self, app: ASGIApp, api_keys: Sequence[str] = (), *,
                 gate: TenantGate | None = None) -> None:
        self.app = app
        self.gate = gate if gate is not None else TenantGate(TenantSource(
            None, flat_keys=api_keys))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        table = self.gate.tenants.current()
        path: str = scope["path"]
        if not table.is_enabled or path.startswith(_OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization")
        is_admin_path = path.startswith(_ADMIN_PATHS)
        presented = _presented_key(header, allow_basic=is_admin_path)
        tenant = table.lookup(presented) if presented else None
        if tenant is None:
            message = "missing API key" if header is None else "invalid API key"
            hint = "send 'Authorization: Bearer <key>'"
            await _send_error(send, AuthenticationError(f"{message}: {hint}"),
                              basic_realm=is_admin_path)
            return
        if is_admin_path and not tenant.admin:
            await _send_error(send, PermissionDeniedError("this path needs an admin key"))
            return
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        await self._serve(scope, receive, send, tenant)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, tenant: Tenant) -> None:
        gate, metrics = self.gate, self.gate.metrics
        started_s = time.perf_counter()
        status: int | None = None
        lease: Lease | None = None
        try:
            if gate.quota is not None:
                lease = await gate.quota.admit(tenant)
        except MoeflowError as exc:
            if isinstance(exc, QuotaExceededError) and metrics is not None:
                metrics.rate_limited.labels(tenant.name, exc.limit).inc()
            await _send_error(send, exc)
            _log_access(scope, tenant.name, exc.status_code, started_s)
            if metrics is not None:
                metrics.requests.labels(tenant.name, str(exc.status_code)).inc()
            return

        async def watched_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        token = current_tenant.set(tenant)
        prompts_token = request_prompts.set(set())
        try:
            await self.app(scope, receive, watched_send)
        finally:
            request_prompts.reset(prompts_token)
            current_tenant.reset(token)
            record = request_record(scope)
            final = record.failed_status or status or 500
            if gate.quota is not None:
                if lease is not None:
                    await gate.quota.release(lease)
                if record.model and final < 400:
                    await gate.quota.record_usage(tenant.name, record.model, requests=1)
            if metrics is not None:
                metrics.requests.labels(tenant.name, str(final)).inc()
            _log_access(scope, tenant.name, final, started_s)


def _log_access(scope: Scope, tenant: str, status: int, started_s: float) -> None:
    access_logger.info("%s %s %d tenant=%s %.0fms", scope.get("method", ""), scope["path"],
                       status, tenant, 1000 * (time.perf_counter() - started_s))


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
